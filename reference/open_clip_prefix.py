"""Official-style TCPA on open_clip's own vision blocks, written independently of ``tcpa_kernels``.

The same computation as ``reference.prefix.prefix_prompts`` (each block's own forward on ``[prompts ; tokens]``
through forward hooks, the block's output is its last N tokens), with the mask in the convention of open_clip's
attentions: ``nn.MultiheadAttention`` (``ResidualAttentionBlock``) takes a 2-D ``[L, S]`` or 3-D ``[B*H, L, S]``
mask, open_clip's ``Attention`` (``CustomResidualAttentionBlock``) reshapes a 3-D one to ``[B, H, L, S]``, both read
a bool mask as "True = masked out", and ``ResidualAttentionBlock`` casts the mask to the tokens' dtype (a bool mask
would become an additive 0/1). The masks are therefore float ``[B*H, P+N, P+N]``: additive 0 / -inf for
``renormalize=True``; {0, 1} for the published post-softmax mask, which ``dense_sdpa`` multiplies after the softmax
while it stands in for ``F.scaled_dot_product_attention`` (both attentions call it; ``nn.MultiheadAttention``
through ``F.multi_head_attention_forward``, and a float mask keeps it off its fused fast path).

The stand-in replaces SDPA for every attention while the hooks are active: run only the vision tower inside (a
CLIP model's text tower has a causal additive mask that ``dense_sdpa`` would multiply).
"""

import torch

from reference.prefix import dense_mask, prefix_prompts


def open_clip_mask(prompt_mask, num_heads, renormalize, dtype):
    """[B, N, P] selection -> the float [B*H, P+N, P+N] mask over [prompts ; tokens] (prompt rows: all keys)."""
    keep = dense_mask(prompt_mask, True)  # [B, 1, P+N, P+N] bool
    B, _, L, _ = keep.shape
    keep = keep.expand(B, num_heads, L, L).reshape(B * num_heads, L, L)
    if renormalize:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    return keep.to(dtype)


def open_clip_prefix_prompts(blocks, layer_params, *, renormalize=False, **match):
    """``prefix_prompts`` with open_clip's mask convention (the class token is the one prefix token); ``match``:
    topk_cls, topk_img, prompt_len_cls, prompt_len_img."""
    return prefix_prompts(blocks, layer_params, **match, num_prefix_tokens=1, renormalize=renormalize,
                          make_mask=lambda selection, blk, x: open_clip_mask(selection, blk.attn.num_heads,
                                                                             renormalize, x.dtype))
