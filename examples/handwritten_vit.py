"""TCPA in a hand-written ViT: one ``TCPAPrompts`` module per block, called where the softmax was.

The ViT below is written the way research code often writes it (separate query/key/value projections,
``attention_norm`` / ``ffn_norm``); nothing of it comes from timm. Adding TCPA takes three lines per block:
create a ``TCPAPrompts`` in ``__init__``, call it with the attention's q/k/v, the block input and a function that
turns prompt tokens into keys and values the way the attention does it for tokens, and add
``get_matching_loss(model)`` to the loss.

    python examples/handwritten_vit.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import tcpa_kernels as tk


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def heads(self, h):
        """h [B, S, C] -> q, k, v [B, H, S, D]."""
        B, S, _ = h.shape
        return [proj(h).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
                for proj in (self.query, self.key, self.value)]

    def merge(self, o):
        """o [B, H, S, D] -> [B, S, C] through the output projection."""
        return self.out(o.transpose(1, 2).flatten(2))

    def forward(self, h, attn_mask=None):
        return self.merge(F.scaled_dot_product_attention(*self.heads(h), attn_mask=attn_mask))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.tcpa: tk.TCPAPrompts | None = None  # set by add_tcpa

    def forward(self, x, attn_mask=None):  # x [B, N, C], the residual stream
        h = self.attention_norm(x)
        if self.tcpa is None:
            x = x + self.attn(h, attn_mask)
        else:
            q, k, v = self.attn.heads(h)  # [B, H, N, D]
            # prompts [1, P, C] become keys/values the way tokens do: the block's norm, then its K/V projections
            o = self.tcpa(q, k, v, x, lambda prompts: self.attn.heads(self.attention_norm(prompts))[1:])
            x = x + self.attn.merge(o)  # o [B, H, N, D]
        return x + self.ffn(self.ffn_norm(x))


class ViT(nn.Module):
    def __init__(self, img_size=32, patch_size=8, dim=64, depth=4, num_heads=4, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (img_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N-1, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, N, C]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def add_tcpa(model: ViT, **pools) -> ViT:
    """Freeze the backbone, give every block its prompts (trainable), keep the head trainable."""
    model.requires_grad_(False)
    for blk in model.blocks:
        like = blk.attention_norm.weight  # the prompts live in the backbone's dtype and device
        blk.tcpa = tk.TCPAPrompts(like.shape[0], num_prefix_tokens=1, device=like.device, dtype=like.dtype, **pools)
        blk.tcpa.train(model.training)  # a new module trains by default: prompt dropout follows the model's mode
    model.head.requires_grad_(True)
    return model


def main():
    torch.manual_seed(0)
    model = add_tcpa(ViT(), pool_size_cls=6, pool_size_img=6, topk_cls=3, topk_img=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model.train()
    for step in range(3):
        tk.set_selection(model, "random" if step == 0 else "topk")  # the published recipe starts at random
        loss = F.cross_entropy(model(images), labels) + 0.01 * tk.get_matching_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}, matching loss {tk.get_matching_loss(model).item():.4f}")
    print(f"trainable: {sum(p.numel() for p in params)} of {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
