"""``match_prompts``: cosine matching of tokens against the pool keys and top-k selection (docs/how-it-works.md,
'Matching and selection')."""

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
from tcpa_kernels.ops.match_select import _cosines_torch, match_select
from tcpa_kernels.ops.selection import Selection, entry_selection


def match_scores(x: Tensor, keys_cls: Tensor, keys_img: Tensor) -> Tensor:
    """Cosine similarity of every token with every key of both pools: [B, N, Pc + Pi] in x's dtype
    (differentiable).

    Norms and cosines are computed in fp32 (fp64 for fp64 x), under autocast too, with ``match_select``'s rule
    (norms clamped at 1e-12, F.normalize's): a zero token scores 0 against every key, and a 16-bit token whose
    squared norm overflows its dtype still gets its cosines. Computed as (x @ normalize(keys).T) / |x|: no
    normalised copy of x ([B, N, C]) is allocated; an fp32 x (the residual stream) is used as it is, so the
    tensor saved for backward is the one norm1 saves anyway, while a 16-bit x is converted to fp32 once (the
    copy autograd saves).
    """
    validate_match_inputs(x, keys_cls, keys_img)
    with torch.autocast(x.device.type, enabled=False):
        return _cosines_torch(x, keys_cls, keys_img, None)[0].to(x.dtype)


def loss_from_words(scores: Tensor, bits: Tensor, num_prefix_tokens: int, topk_cls: int, topk_img: int) -> Tensor:
    """:func:`matching_loss` without the argument checks, for the model path (no host sync).

    The caller guarantees what ``matching_loss`` checks: ``bits`` the words ``topk_bits`` made from these scores
    with these ``num_prefix_tokens``, ``topk_cls`` and ``topk_img``.
    """
    B, N, E = scores.shape
    picked = scores * entry_selection(bits, E).to(scores.dtype)  # [B, N, E], E <= 64
    acc_dtype = torch.promote_types(scores.dtype, torch.float32)
    loss = scores.new_zeros((), dtype=acc_dtype)
    for tokens, k in ((slice(0, num_prefix_tokens), topk_cls), (slice(num_prefix_tokens, N), topk_img)):
        n_picked = B * (tokens.stop - tokens.start) * k
        if n_picked:
            loss = loss + 1 - picked[:, tokens].sum(dtype=acc_dtype) / n_picked
    return loss


def check_words(bits: Tensor, num_entries: int, num_prefix_tokens: int, topk_cls: int, topk_img: int) -> None:
    """ValueError unless every prefix token's word selects ``topk_cls`` of the ``num_entries`` entries and every
    patch token's ``topk_img``, with no bit at or above ``num_entries``. Reads one flag: a host sync on CUDA."""
    counts = entry_selection(bits, num_entries).sum(-1)  # [B, N]: the bits set among the entries
    groups = (("topk_cls", "prefix", counts[:, :num_prefix_tokens], topk_cls),
              ("topk_img", "patch", counts[:, num_prefix_tokens:], topk_img))
    stray = bits >> num_entries if num_entries < 64 else torch.zeros_like(bits)  # != 0: a bit >= num_entries set
    if not torch.stack([stray.ne(0).any(), *((c != k).any() for _, _, c, k in groups)]).any():  # the one sync
        return
    for name, group, c, k in groups:
        got = c.unique().tolist()
        if c.numel() and got != [k]:
            raise ValueError(f"{name}: expected the number of entries that bits selects per {group} token "
                             f"({' or '.join(map(str, got))}), got {k}")
    word = bits[stray != 0][0].item() % 2**64
    raise ValueError(f"bits: expected words with bits 0..{num_entries - 1} only (one per scores column), got the "
                     f"word {word:#x}")


def matching_loss(scores: Tensor, bits: Tensor, num_prefix_tokens: int, topk_cls: int, topk_img: int) -> Tensor:
    """mean(1 - s_topk) over prefix tokens + the same over patch tokens, from selection words.

    scores: float [B, N, E] (differentiable, E <= 64 entries), bits: int64 [B, N] selection words (bit e = entry e,
    as ``tcpa_fused_attention`` returns them), ``num_prefix_tokens`` in [0, N], ``topk_cls``/``topk_img`` the
    entries each prefix / patch token selected (1..E). A token group that is empty adds 0. Pure PyTorch: it has
    second-order gradients.

    The words are checked against ``topk_cls``/``topk_img`` (each prefix word sets ``topk_cls`` bits, each patch
    word ``topk_img``, none at or above E): this reads one flag from the device, a host sync on CUDA. The model
    path calls :func:`loss_from_words`, unchecked.
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
    check_words(bits, E, num_prefix_tokens, topk_cls, topk_img)
    return loss_from_words(scores, bits, num_prefix_tokens, topk_cls, topk_img)


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
