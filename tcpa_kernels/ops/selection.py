"""Top-k prompt selection: per token, a 64-bit word whose bit e says "pool entry e is selected".

The attention kernels read one int64 per token instead of a [B, N, P] mask: prompt token p belongs to
pool entry ``entry(p)`` (CLS entries first, then image entries) and is selected iff bit ``entry(p)`` is
set. Prefix tokens only ever get CLS bits and patch tokens only image bits, so a token never uses the
other pool's prompts.

Why selection is its own kernel and not fused into the attention kernel: the attention grid is
(batch*head, query block), so an in-attention top-k would redo the same per-token sort H times
(12x at ViT-B), while this kernel does it once per token and hands over 8 bytes per token
(B*N*8 bytes: 200 KB at ViT-B, B=128). Cosine matching is a [B*N, C] x [C, Pool] product that reads
``x``, which the attention kernel never reads (it reads per-head q/k/v), so it stays a cuBLAS GEMM
before both. These are cost arguments; the GPU measurement is tracked in issue #5.

Tie rule: among equal scores the lower entry index wins (the same as ``reference.match_prompts_ref``).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-(2**31))  # below every float key


@triton.jit
def select_topk(b_s, m_valid, k_row, k_max):
    """Top-k of each row among its valid entries: (bits int64 [BLOCK_T], sel bool [BLOCK_T, E_PAD]).

    b_s [BLOCK_T, E_PAD] float scores, m_valid bool [BLOCK_T, E_PAD] (the row's own pool), k_row int [BLOCK_T]
    entries to pick (<= its valid count), k_max = max(k_row). Ranks on an int32 key that orders floats like their
    values (NaN ranks as -inf, -0.0 as +0.0) and puts invalid or picked entries strictly below every score, so a
    row always gets exactly k_row distinct entries of its own pool, ties going to the lower entry index.
    """
    o_e = tl.arange(0, b_s.shape[1])
    b_s = b_s.to(tl.float32)
    b_s = tl.where(b_s != b_s, float("-inf"), tl.where(b_s == 0.0, 0.0, b_s))
    b_key = b_s.to(tl.int32, bitcast=True)
    b_key = tl.where(b_key >= 0, b_key, b_key ^ 0x7FFFFFFF)  # monotone in the float value
    b_key = tl.where(m_valid, b_key, _INT32_MIN)
    sel = tl.zeros(b_s.shape, dtype=tl.int1)
    for i in range(0, k_max):
        best = tl.argmax(b_key, axis=1, tie_break_left=True)  # [BLOCK_T]
        picked = o_e[None, :] == best[:, None]
        sel = sel | (picked & (i < k_row)[:, None])
        b_key = tl.where(picked, _INT32_MIN, b_key)
    one = tl.full(b_s.shape, 1, dtype=tl.int64)
    bits = tl.sum(tl.where(sel, one << o_e[None, :].to(tl.int64), 0), axis=1)  # distinct powers of two
    return bits, sel


@triton.jit
def own_pool(o_t, N, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, E_PAD: tl.constexpr):
    """For rows o_t (= b*N + n): (is_prefix [BLOCK_T], valid entries bool [BLOCK_T, E_PAD], k [BLOCK_T])."""
    is_prefix = (o_t % N) < num_prefix_tokens
    o_e = tl.arange(0, E_PAD)
    lo = tl.where(is_prefix, 0, pool_cls)
    hi = tl.where(is_prefix, pool_cls, pool_cls + pool_img)
    m_valid = (o_e[None, :] >= lo[:, None]) & (o_e[None, :] < hi[:, None])
    return is_prefix, m_valid, tl.where(is_prefix, k_cls, k_img)


@triton.jit
def _topk_bits_kernel(
    SCORES,  # [B*N, E] float, E = pool_cls + pool_img
    BITS,  # [B*N] int64 (output)
    n_rows,
    N,
    num_prefix_tokens,
    pool_cls,
    pool_img,
    k_cls,
    k_img,
    k_max,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row = b*N + n
    m_t = o_t < n_rows
    _, m_valid, k_row = own_pool(o_t, N, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, E_PAD)
    m_valid = m_valid & m_t[:, None]
    o_e = tl.arange(0, E_PAD)
    b_s = tl.load(SCORES + o_t[:, None] * (pool_cls + pool_img) + o_e[None, :], mask=m_valid, other=0.0)
    b_bits, _ = select_topk(b_s, m_valid, k_row, k_max)
    tl.store(BITS + o_t, b_bits, mask=m_t)


def _topk_bits_torch(scores, num_prefix_tokens, pool_cls, k_cls, k_img):
    """Torch twin of the kernel. scores [B, N, E] -> bits int64 [B, N] (NaN ranks as -inf)."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    weights = torch.ones(scores.shape[-1], dtype=torch.int64, device=scores.device)
    weights = torch.bitwise_left_shift(weights, torch.arange(scores.shape[-1], device=scores.device))
    bits = torch.empty(scores.shape[:2], dtype=torch.int64, device=scores.device)
    groups = ((slice(0, num_prefix_tokens), slice(0, pool_cls), k_cls),
              (slice(num_prefix_tokens, None), slice(pool_cls, None), k_img))
    for tokens, entries, k in groups:
        s = scores[:, tokens, entries]
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        bits[:, tokens] = weights[entries][order].sum(-1)  # distinct powers of two: sum == or
    return bits


def max_topk(num_tokens, num_prefix_tokens, k_cls, k_img):
    """The largest k any row of the sequence uses (the kernels' loop count)."""
    return max(k_cls if num_prefix_tokens > 0 else 0, k_img if num_tokens > num_prefix_tokens else 0)


def topk_bits(scores, *, num_prefix_tokens, pool_cls, k_cls, k_img, backend):
    """Per-token selection words from matching scores.

    scores: [B, N, pool_cls + pool_img]; prefix tokens (the first ``num_prefix_tokens``) choose their
    top ``k_cls`` among the first ``pool_cls`` columns, patch tokens their top ``k_img`` among the rest.
    returns int64 [B, N]. Selection is not differentiable.
    """
    B, N, E = scores.shape
    if backend == "torch":
        return _topk_bits_torch(scores.detach(), num_prefix_tokens, pool_cls, k_cls, k_img)
    scores = scores.detach().contiguous()
    bits = torch.empty(B, N, dtype=torch.int64, device=scores.device)
    n_rows = B * N
    if n_rows == 0:
        return bits
    BLOCK_T = 32
    grid = (triton.cdiv(n_rows, BLOCK_T),)
    _topk_bits_kernel[grid](
        scores, bits, n_rows, N, num_prefix_tokens, pool_cls, E - pool_cls, k_cls, k_img,
        max_topk(N, num_prefix_tokens, k_cls, k_img),
        BLOCK_T=BLOCK_T, E_PAD=triton.next_power_of_2(E),
    )
    return bits


def entry_selection(bits, num_entries):
    """bool [B, N, E] view of selection words (small: E <= 64 entries, not prompts)."""
    shifts = torch.arange(num_entries, device=bits.device)
    return (torch.bitwise_right_shift(bits[..., None], shifts) & 1).bool()


@dataclass
class Selection:
    """Which prompts each query token may use, in one of the two encodings the kernels read.

    Either ``mask`` (bool [B, N, P]) or ``bits`` (int64 [B, N]) with the pool layout that maps prompt
    tokens to entries: prompts are [CLS pool: pool_cls*len_cls tokens ; image pool: rest].
    """

    mask: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    pool_cls: int = 0
    len_cls: int = 1
    len_img: int = 1

    def op_args(self) -> tuple:
        """``(mask, bits, pool_cls, len_cls, len_img)``: a Selection as the custom ops take it (one of mask / bits
        is None); ``Selection(*args)`` inside the op rebuilds it."""
        return self.mask, self.bits, self.pool_cls, self.len_cls, self.len_img

    @property
    def mask_mode(self) -> int:
        return 0 if self.mask is not None else 1

    def kernel_args(self):
        """(MASK, BITS, n_cls_prompts, pool_cls, len_cls, len_img); the unused pointer is a placeholder."""
        if self.mask is not None:
            mask = self.mask.contiguous().view(torch.uint8)
            return mask, mask, 0, 0, 1, 1
        return self.bits, self.bits, self.pool_cls * self.len_cls, self.pool_cls, self.len_cls, self.len_img

    def rows(self, start, end, num_prompts):
        """bool [B, end-start, P] for query tokens start..end-1 (torch backend, one chunk at a time)."""
        if self.mask is not None:
            return self.mask[:, start:end]
        n_cls = self.pool_cls * self.len_cls
        p = torch.arange(num_prompts, device=self.bits.device)
        entry = torch.where(p < n_cls, p // self.len_cls, self.pool_cls + (p - n_cls) // self.len_img)
        return (torch.bitwise_right_shift(self.bits[:, start:end, None], entry) & 1).bool()
