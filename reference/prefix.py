"""Official-style TCPA on any ViT block family (TCPA_SPEC.md §1-§4), written independently of ``tcpa_kernels``.

The published code concatenates each layer's prompts into the sequence and runs the block's ordinary attention over
``[prompts ; tokens]`` with a dense ``[B, 1, P+N, P+N]`` mask. ``prefix_prompts`` does exactly that to the blocks of
a plain (unpatched) model through forward hooks: before a block runs, its input ``x [B, N, C]`` is matched against
the layer's keys (``match_prompts_ref``), the prompts ``[P, C]`` are put in front of it, and the block's own
forward (its norms, projections, rotary embedding, MLP) runs on ``[B, P+N, C]`` with the mask as ``attn_mask``;
the block's output is its last N tokens. Prompts are prefix tokens: attention modules that skip their first
``num_prefix_tokens`` tokens when rotating (timm EVA) skip the prompts too.

Masks: ``renormalize=True`` passes a bool mask to the family's own ``scaled_dot_product_attention`` (an ordinary
masked softmax). ``renormalize=False`` (the published method) multiplies the softmax by a float {0, 1} mask; no
attention kernel does that, so ``dense_sdpa`` stands in for ``torch.nn.functional.scaled_dot_product_attention``
while the hooks are active.
"""

import contextlib

import torch
import torch.nn.functional as F

from reference.matching import match_prompts_ref


def dense_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Eager attention whose float mask multiplies the probabilities after the softmax (the published code).
    q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, H, S, D]."""
    assert dropout_p == 0.0 and not is_causal, "the reference runs in eval mode without causal masks"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    probs = (scale * q @ k.transpose(-1, -2)).softmax(dim=-1)  # [B, H, S, S]
    if attn_mask is not None:
        probs = probs * attn_mask
    return probs @ v


def dense_mask(prompt_mask, renormalize):
    """[B, N, P] selection -> the [B, 1, P+N, P+N] attention mask over [prompts ; tokens] (prompt rows: all keys)."""
    B, N, P = prompt_mask.shape
    keep = torch.ones(B, P + N, P + N, dtype=torch.bool, device=prompt_mask.device)
    keep[:, P:, :P] = prompt_mask
    return keep[:, None] if renormalize else keep[:, None].double()


@contextlib.contextmanager
def prefix_prompts(blocks, layer_params, *, topk_cls, topk_img, prompt_len_cls=1, prompt_len_img=1,
                   num_prefix_tokens=1, renormalize=False):
    """While active, block i of ``blocks`` runs on [prompts_i ; x] with the TCPA mask of x.

    layer_params[i] = (keys_cls [Pc, C], keys_img [Pi, C], prompts_cls [Pc, Lc, C], prompts_img [Pi, Li, C]).
    Yields a list that receives each layer's matching loss in order. The blocks must be in eval mode.
    """
    losses, handles, saved = [], [], []
    match_kw = dict(topk_cls=topk_cls, topk_img=topk_img, prompt_len_cls=prompt_len_cls,
                    prompt_len_img=prompt_len_img, num_prefix_tokens=num_prefix_tokens)

    for blk, (keys_cls, keys_img, prompts_cls, prompts_img) in zip(blocks, layer_params, strict=True):
        prompts = torch.cat([prompts_cls.flatten(0, 1), prompts_img.flatten(0, 1)])  # [P, C]
        P = prompts.shape[0]

        def before(module, args, kwargs, prompts=prompts, keys=(keys_cls, keys_img)):
            x, *rest = args
            mask, loss = match_prompts_ref(x, *keys, **match_kw)
            losses.append(loss)
            seq = torch.cat([prompts[None].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, P+N, C]
            return (seq, *rest), kwargs | {"attn_mask": dense_mask(mask, renormalize)}

        def after(module, args, kwargs, out, P=P):
            return out[:, P:]

        handles.append(blk.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(blk.register_forward_hook(after, with_kwargs=True))
        for m in blk.modules():
            for name, value in (("num_prefix_tokens", P), ("fused_attn", None)):
                if isinstance(getattr(m, name, None), bool | int):
                    saved.append((m, name, getattr(m, name)))
                    setattr(m, name, True if value is None else getattr(m, name) + value)
    original_sdpa = F.scaled_dot_product_attention
    if not renormalize:
        F.scaled_dot_product_attention = dense_sdpa
    try:
        yield losses
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for handle in handles:
            handle.remove()
        for m, name, value in saved:
            setattr(m, name, value)
