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

import contextlib

import torch

from reference.matching import match_prompts_ref
from reference.prefix import dense_mask, prefix_hooks


def open_clip_mask(prompt_mask, num_heads, renormalize, dtype):
    """[B, N, P] selection -> the float [B*H, P+N, P+N] mask over [prompts ; tokens] (prompt rows: all keys)."""
    keep = dense_mask(prompt_mask, True)  # [B, 1, P+N, P+N] bool
    B, _, L, _ = keep.shape
    keep = keep.expand(B, num_heads, L, L).reshape(B * num_heads, L, L)
    if renormalize:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    return keep.to(dtype)


@contextlib.contextmanager
def open_clip_prefix_prompts(blocks, layer_params, *, topk_cls, topk_img, prompt_len_cls=1, prompt_len_img=1,
                             renormalize=False):
    """TCPA: while active, open_clip block i of ``blocks`` runs on [prompts_i ; x] with the TCPA mask of x (the
    class token is the one prefix token).

    layer_params[i] = (keys_cls [Pc, C], keys_img [Pi, C], prompts_cls [Pc, Lc, C], prompts_img [Pi, Li, C]).
    Yields a list that receives each layer's matching loss in order. The blocks must be in eval mode.
    """
    losses = []
    match_kw = dict(topk_cls=topk_cls, topk_img=topk_img, prompt_len_cls=prompt_len_cls,
                    prompt_len_img=prompt_len_img, num_prefix_tokens=1)

    def layer_input(blk, keys_cls, keys_img, prompts_cls, prompts_img):
        prompts = torch.cat([prompts_cls.flatten(0, 1), prompts_img.flatten(0, 1)])  # [P, C]

        def make(x):
            mask, loss = match_prompts_ref(x, keys_cls, keys_img, **match_kw)
            losses.append(loss)
            return prompts, open_clip_mask(mask, blk.attn.num_heads, renormalize, x.dtype)

        return make

    inputs = [layer_input(blk, *params) for blk, params in zip(blocks, layer_params, strict=True)]
    with prefix_hooks(blocks, inputs, post_softmax_mask=not renormalize):
        yield losses
