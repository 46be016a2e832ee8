"""Reference prompt-augmented attention (docs/how-it-works.md, 'Attention') and the VPT-deep baseline."""

import math

import torch


def tcpa_attention_ref(q, k, v, prompt_k, prompt_v, prompt_mask, *, scale=None, renormalize=False):
    """Dense TCPA attention.

    q, k, v:              [B, H, N, D]   real tokens (queries, keys, values)
    prompt_k, prompt_v:   [H, P, D] (shared by the batch) or [B, H, P, D]
    prompt_mask:          bool [B, N, P], True where token n may use prompt p
    returns               [B, H, N, D]

    renormalize=False: softmax over [prompts ; tokens], then the prompt columns are multiplied by the
    mask after the softmax (no renormalisation) -- the published implementation.
    renormalize=True:  ordinary masked softmax (unselected prompts get -inf before the softmax).
    """
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if prompt_k.dim() == 3:
        prompt_k, prompt_v = prompt_k.expand(B, -1, -1, -1), prompt_v.expand(B, -1, -1, -1)
    keys = torch.cat([prompt_k, k], dim=2)  # [B, H, P+N, D]
    values = torch.cat([prompt_v, v], dim=2)  # [B, H, P+N, D]
    scores = scale * q @ keys.transpose(-1, -2)  # [B, H, N, P+N]
    token_cols = torch.ones(B, N, N, dtype=torch.bool, device=q.device)
    keep = torch.cat([prompt_mask, token_cols], dim=-1)[:, None]  # [B, 1, N, P+N]
    if renormalize:
        probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    else:
        probs = scores.softmax(dim=-1) * keep.to(scores.dtype)
    return probs @ values


def vpt_attention_ref(q, k, v, *, scale=None):
    """Plain softmax attention, the VPT-deep baseline (prompts are ordinary tokens there).

    q, k, v: [B, H, S, D] -> [B, H, S, D]
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (scale * q @ k.transpose(-1, -2)).softmax(dim=-1) @ v
