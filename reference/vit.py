"""Reference TCPA and VPT-deep forwards of a timm VisionTransformer (docs/how-it-works.md, 'In a ViT block'),
written independently of ``tcpa_kernels.vit``: it reads the model's frozen modules and takes the prompt parameters
as arguments."""

import torch

from reference.attention import tcpa_attention_ref, vpt_attention_ref
from reference.matching import match_prompts_ref


def _heads(attn, h):
    """[B, S, C] -> q, k, v [B, H, S, D] through attn.qkv, q_norm, k_norm."""
    B, S, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, S, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k), v


def _block(blk, x, attention):
    """Pre-norm block: x + ls1(proj(attention(q, k, v))); x + ls2(mlp(norm2(x))) (eval mode)."""
    B, S, C = x.shape
    q, k, v = _heads(blk.attn, blk.norm1(x))
    o = attention(q, k, v).transpose(1, 2).reshape(B, S, C)
    x = x + blk.ls1(blk.attn.proj(blk.attn.norm(o)))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _embed(model, images):
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def tcpa_vit_forward_ref(model, images, layer_params, *, topk_cls, topk_img, prompt_len_cls=1, prompt_len_img=1,
                         renormalize=False):
    """layer_params[i] = (keys_cls [Pc,C], keys_img [Pi,C], prompts_cls [Pc,Lc,C], prompts_img [Pi,Li,C]).

    Returns (logits, matching loss summed over layers). No prompt dropout (eval).
    """
    x = _embed(model, images)
    total_loss = 0.0
    for blk, (keys_cls, keys_img, prompts_cls, prompts_img) in zip(model.blocks, layer_params, strict=True):
        mask, loss = match_prompts_ref(x, keys_cls, keys_img, topk_cls=topk_cls, topk_img=topk_img,
                                       prompt_len_cls=prompt_len_cls, prompt_len_img=prompt_len_img,
                                       num_prefix_tokens=model.num_prefix_tokens)
        total_loss = total_loss + loss
        prompts = torch.cat([prompts_cls.flatten(0, 1), prompts_img.flatten(0, 1)])[None]  # [1, P, C]
        _, prompt_k, prompt_v = _heads(blk.attn, blk.norm1(prompts))

        def attention(q, k, v, pk=prompt_k[0], pv=prompt_v[0], m=mask):
            return tcpa_attention_ref(q, k, v, pk, pv, m, renormalize=renormalize)

        x = _block(blk, x, attention)
    return model.forward_head(model.norm(x)), total_loss


def vpt_vit_forward_ref(model, images, layer_prompts):
    """VPT: layer_prompts[i] is [P, C] (inserted/replacing after the prefix tokens) or None (kept). Returns logits."""
    x = _embed(model, images)
    n_pre, n_prompts = model.num_prefix_tokens, 0
    for blk, prompts in zip(model.blocks, layer_prompts, strict=True):
        if prompts is not None:
            x = torch.cat([x[:, :n_pre], prompts.expand(x.shape[0], -1, -1), x[:, n_pre + n_prompts:]], dim=1)
            n_prompts = prompts.shape[0]
        x = _block(blk, x, vpt_attention_ref)
    x = torch.cat([x[:, :n_pre], x[:, n_pre + n_prompts:]], dim=1)
    return model.forward_head(model.norm(x))
