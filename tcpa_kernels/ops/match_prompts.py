"""``match_prompts``: cosine matching of tokens against the pool keys and top-k selection (TCPA_SPEC.md §2)."""

import torch
from torch import Tensor

from tcpa_kernels._validate import (
    FLOAT_DTYPES,
    MAX_POOL_ENTRIES,
    check_int,
    check_pool_config,
    check_tensor,
    describe,
    validate_match_inputs,
)
from tcpa_kernels.ops.match_select import match_select
from tcpa_kernels.ops.selection import Selection, entry_selection


def match_scores(x: Tensor, keys_cls: Tensor, keys_img: Tensor) -> Tensor:
    """Cosine similarity of every token with every key of both pools: [B, N, Pc + Pi] (differentiable).

    Computed as (x @ normalize(keys).T) / |x| so no normalised copy of x ([B, N, C]) is allocated, in x's own
    dtype even under autocast: the fp32 residual stream is then the tensor saved for backward, which norm1
    saves anyway, where autocast would save an extra bf16 copy of x in every layer. The selection also ranks
    the scores at x's precision.
    """
    with torch.autocast(x.device.type, enabled=False):
        keys = torch.nn.functional.normalize(torch.cat([keys_cls, keys_img]).to(x.dtype), dim=-1)  # [E, C]
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)  # [B, N, 1]
        return (x @ keys.T) / norms


def matching_loss(scores: Tensor, bits: Tensor, num_prefix_tokens: int, topk_cls: int, topk_img: int) -> Tensor:
    """mean(1 - s_topk) over prefix tokens + the same over patch tokens, from selection words.

    scores: float [B, N, E] (differentiable, E <= 64 entries), bits: int64 [B, N] selection words (bit e = entry e,
    as ``tcpa_fused_attention`` returns them), ``num_prefix_tokens`` in [0, N], ``topk_cls``/``topk_img`` the
    entries each prefix / patch token selected (1..E). A token group that is empty adds 0. Pure PyTorch: it has
    second-order gradients.
    """
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, E = scores.shape
    if not 1 <= E <= MAX_POOL_ENTRIES:
        raise ValueError(f"scores: expected shape (B, N, E) with 1 <= E <= {MAX_POOL_ENTRIES} pool entries, "
                         f"got {describe(scores)}")
    check_tensor("bits", bits, ndim=2, dtypes=(torch.int64,))
    if bits.device != scores.device or tuple(bits.shape) != (B, N):
        raise ValueError(f"bits: expected int64 shape {(B, N)} on {scores.device} (as scores), got {describe(bits)}")
    check_int("num_prefix_tokens", num_prefix_tokens, 0, N)
    check_int("topk_cls", topk_cls, 1, E)
    check_int("topk_img", topk_img, 1, E)
    picked = scores * entry_selection(bits, E).to(scores.dtype)  # [B, N, E], E <= 64
    acc_dtype = torch.promote_types(scores.dtype, torch.float32)
    loss = scores.new_zeros((), dtype=acc_dtype)
    for tokens, k in ((slice(0, num_prefix_tokens), topk_cls), (slice(num_prefix_tokens, N), topk_img)):
        n_picked = B * (tokens.stop - tokens.start) * k
        if n_picked:
            loss = loss + 1 - picked[:, tokens].sum(dtype=acc_dtype) / n_picked
    return loss


def match_prompts(x: Tensor, keys_cls: Tensor, keys_img: Tensor, *, topk_cls: int, topk_img: int,
                  prompt_len_cls: int = 1, prompt_len_img: int = 1, num_prefix_tokens: int = 1,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-token top-k prompt selection by cosine matching.

    Args:
        x: ``[B, N, C]`` block input (residual stream before norm1); prefix tokens first.
        keys_cls: ``[Pc, C]`` keys of the CLS pool (used by the first ``num_prefix_tokens`` tokens).
        keys_img: ``[Pi, C]`` keys of the image pool (used by the patch tokens). Pc + Pi <= 64.
        topk_cls, topk_img: entries each prefix / patch token selects (1..pool size).
        prompt_len_cls, prompt_len_img: prompt tokens per pool entry (Lc, Li).
        num_prefix_tokens: CLS + register/distillation tokens at the start of the sequence.
        backend: "auto" | "triton" | "torch" (the top-k runs as a Triton kernel on the triton backend).

    Returns:
        ``(prompt_mask, matching_loss)``: bool ``[B, N, Pc*Lc + Pi*Li]`` and a scalar differentiable in x and
        the keys. Ties in the scores go to the lower entry index.
    """
    validate_match_inputs(x, keys_cls, keys_img)
    check_pool_config("", keys_cls.shape[0], keys_img.shape[0], topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                      num_prefix_tokens, x.shape[1])
    bits, terms = match_select(x, keys_cls, keys_img, topk_cls=topk_cls, topk_img=topk_img,
                               num_prefix_tokens=num_prefix_tokens, backend=backend)  # [B, N], [B, N]
    P = keys_cls.shape[0] * prompt_len_cls + keys_img.shape[0] * prompt_len_img
    selection = Selection(bits=bits, pool_cls=keys_cls.shape[0], len_cls=prompt_len_cls, len_img=prompt_len_img)
    return selection.rows(0, x.shape[1], P), terms.sum()
