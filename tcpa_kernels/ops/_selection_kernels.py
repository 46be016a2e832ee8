"""Triton kernels of the top-k selection (``selection.py`` is the Python side): ``select_topk`` and ``own_pool``,
shared with the matching kernels, and ``_topk_bits_kernel`` with its launcher. Imported only on the triton backend.
"""

import torch
import triton
import triton.language as tl

from tcpa_kernels._backend import cdiv, next_power_of_2
from tcpa_kernels.ops.selection import max_topk

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
def own_pool(o_t, N, num_prefix_tokens, pool_cls, own_cls, own_img, k_cls, k_img, E_PAD: tl.constexpr):
    """For rows o_t (= b*N + n) of pools whose image entries start at pool_cls: (is_prefix [BLOCK_T], valid entries
    bool [BLOCK_T, E_PAD], k [BLOCK_T]). A row's own pools are its first own_cls CLS entries and first own_img image
    entries, and it picks k_cls / k_img of them (scalars, or per row: ``row_layout``)."""
    is_prefix = (o_t % N) < num_prefix_tokens
    o_e = tl.arange(0, E_PAD)
    lo = tl.where(is_prefix, 0, pool_cls)
    hi = tl.where(is_prefix, own_cls, pool_cls + own_img)
    m_valid = (o_e[None, :] >= lo[:, None]) & (o_e[None, :] < hi[:, None])
    return is_prefix, m_valid, tl.where(is_prefix, k_cls, k_img)


@triton.jit
def row_layout(LAYOUTS, o_t, m_t, N, pool_cls, pool_img, k_cls, k_img, HAS_LAYOUTS: tl.constexpr):
    """(own_cls, own_img, k_cls, k_img) of rows o_t: their sample's row of LAYOUTS (int [B, 6], a bank of tasks with
    pools of different sizes) with HAS_LAYOUTS, else the scalars themselves (one layout for all)."""
    own_cls, own_img, kc, ki = pool_cls, pool_img, k_cls, k_img
    if HAS_LAYOUTS:  # resolved at compile time: one return type
        p_row = LAYOUTS + (o_t // N) * 6
        own_cls = tl.load(p_row, mask=m_t, other=1)
        own_img = tl.load(p_row + 1, mask=m_t, other=1)
        kc = tl.load(p_row + 2, mask=m_t, other=1)
        ki = tl.load(p_row + 3, mask=m_t, other=1)
    return own_cls, own_img, kc, ki


@triton.jit
def _topk_bits_kernel(
    SCORES,  # [B*N, E] float, E = pool_cls + pool_img
    LAYOUTS,  # [B, 6] int: each sample's own pools and k (HAS_LAYOUTS), else unused
    BITS,  # [B*N] int64 (output)
    n_rows,
    N,
    num_prefix_tokens,
    pool_cls,
    pool_img,
    k_cls,
    k_img,
    k_max,
    HAS_LAYOUTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row = b*N + n
    m_t = o_t < n_rows
    own_cls, own_img, kc, ki = row_layout(LAYOUTS, o_t, m_t, N, pool_cls, pool_img, k_cls, k_img, HAS_LAYOUTS)
    _, m_valid, k_row = own_pool(o_t, N, num_prefix_tokens, pool_cls, own_cls, own_img, kc, ki, E_PAD)
    m_valid = m_valid & m_t[:, None]
    o_e = tl.arange(0, E_PAD)
    b_s = tl.load(SCORES + o_t[:, None] * (pool_cls + pool_img) + o_e[None, :], mask=m_valid, other=0.0)
    b_bits, _ = select_topk(b_s, m_valid, k_row, k_max)
    tl.store(BITS + o_t, b_bits, mask=m_t)


def topk_bits(scores, num_prefix_tokens, pool_cls, k_cls, k_img, layouts=None):
    """One launch of ``_topk_bits_kernel``: scores [B, N, E] (fp16/bf16/fp32) -> bits int64 [B, N]; layouts int
    [B, 6] (``Selection.layouts``) or None."""
    B, N, E = scores.shape
    scores = scores.contiguous()
    bits = torch.empty(B, N, dtype=torch.int64, device=scores.device)
    n_rows = B * N
    if n_rows == 0:
        return bits
    BLOCK_T = 32
    _topk_bits_kernel[(cdiv(n_rows, BLOCK_T),)](
        scores, layouts, bits, n_rows, N, num_prefix_tokens, pool_cls, E - pool_cls, k_cls, k_img,
        max_topk(N, num_prefix_tokens, k_cls, k_img), layouts is not None,
        BLOCK_T=BLOCK_T, E_PAD=next_power_of_2(E),
    )
    return bits
