"""Triton kernels of the prompt K/V pass (``tcpa_kernels/_prompt_kv.py``): every layer's prompt tokens through the
layer's frozen LayerNorm and the K/V rows of its frozen packed input projection, one launch for all layers each way
(docs/how-it-works.md, 'Prompt keys and values'). Imported only on the triton backend.

    forward:  x [L, M, C] -> h = LN_l(x_l) (affine: the layer's norm weight and bias)
                          -> kv = h [W_k ; W_v]^T + [b_k ; b_v]   (R = 2 * H * D columns: the layer's H * D key
                             rows of its projection, then its H * D value rows, each a block of rows of a weight:
                             of one packed qkv weight, or of separate k and v weights)
                          written as [L, T, 2, H, P, D] (M = T * P rows: T prompt sets of P tokens), so that each
                          layer's K/V are one contiguous [T, 2, H, P, D] the attention kernels read in place
    backward: g (the same layout) -> dh = (g [W_k ; W_v]) * norm weight -> dx = LN's input gradient of dh

The layers' weights are separate tensors: the kernels read them through a table of their addresses (int64
[L, 6]: the key rows' and the value rows' weights, the norm's weight and bias, the key and value biases; 0 where
absent; ``_prompt_kv_table``), so no stacked copy of the weights is made (the batched GEMM of the torch path copies
the layers' whole packed weights, [L, 3C, C], every forward and again every backward). The table depends on the
addresses only and is made once per set of addresses: it holds no values, and the kernels read the weights as they
are at the launch.

Dot products on tensor cores with fp32 accumulation: fp32 operands as 3xTF32, 16-bit operands in their dtype. The
norm's statistics are fp32, the variance from a second pass over the rows (x - mean, as ``_match_kernels``).

Prompt dropout runs inside both kernels: element (l, m, c) of x is kept, times 1 / (1 - p), where Philox
``tl.rand(seed, (l * M + m) * C + c) >= p`` (its flat index in [L, M, C], int64 offsets; ``seed`` an int64 tensor
the kernels load, ``dropout_seed``), else zeroed. The backward draws the same numbers again, so no mask is drawn by
a separate op, stored or read back (the torch path's dropout: a Bernoulli draw, a product each way and an [L, M, C]
mask kept for the backward). With a mask per sample (the published code's), the B samples' sets share x's rows:
x is [L, P, C] (``KVLayers.shared``), row m of the M = B * P reads x's row m % P under its own multipliers, and the
backward's programs for a block of x's rows (``SET_GROUPS`` of them) add their samples' dx in order into fp32
partials the launcher sums (deterministic), so neither the [L, B, P, C] tokens nor their gradient are made.
"""

import functools

import torch
import triton
import triton.language as tl

from tcpa_kernels._backend import cdiv
from tcpa_kernels.ops._launch import launch
from tcpa_kernels.ops._prompt_kv_table import KVLayers

# Rows, output columns and channels per block, warps, stages: chosen offline from the sm_90 compile report (fp32
# and bf16, with and without the norm and the dropout: tiles ptxas fits without spilling; with 4 warps the fp32 tiles
# spilled, and so did the fp32 backward with the dropout at 2 stages: 255 registers without it, 243 at 1 stage). The
# backward's programs take the norm's row sums over all of C in a first pass and recompute the small GEMM in the
# second rather than keep a [BLOCK_M, C] gradient. Not timed on a GPU yet; tests/compile_sm90.py checks them.
LAUNCH = {"fwd": dict(BLOCK_M=32, BLOCK_R=64, BLOCK_C=32, num_warps=8, num_stages=2),
          "bwd": dict(BLOCK_M=32, BLOCK_R=32, BLOCK_C=64, num_warps=8, num_stages=1)}
# Programs per block of prompt rows in the backward when the samples share the prompt rows (a dropout mask per
# sample): each walks every SET_GROUPS-th sample and writes an fp32 dx partial, the caller sums them. At ViT-B/16
# (12 layers, 36 prompts: 24 blocks of rows) 8 makes 192 programs, more than an H100's 132 SMs; a fixed number, so
# the sum's order does not depend on the device. Not timed on a GPU yet (``benchmarks/tune.py`` sweeps it).
SET_GROUPS = 8


@triton.jit
def _pointer(TABLE, l, column: tl.constexpr, like):
    """Layer l's address in ``column`` of the table, as a pointer to ``like``'s element type."""
    return tl.load(TABLE + l * 6 + column).to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def _kv_rows(TABLE, l, first: tl.constexpr, o_r, half, k_row0, v_row0, stride, like):
    """Pointers [BLOCK_R] to rows o_r (``stride`` elements apart) of layer l's [key rows ; value rows]: row r < half
    of the key block, from row k_row0 of the tensor in column ``first``; else of the value block, from row v_row0
    of the next column's."""
    return tl.where(o_r < half, _pointer(TABLE, l, first, like) + (k_row0 + o_r) * stride,
                    _pointer(TABLE, l, first + 1, like) + (v_row0 + o_r - half) * stride)


@triton.jit
def _dropout_scale(SEED, l, M, C, o_m, o_c, p_drop):
    """Prompt dropout's multipliers [BLOCK_M, BLOCK_C] of rows o_m, channels o_c of layer l: 1 / (1 - p_drop) where
    ``tl.rand(seed, i) >= p_drop`` for the element's flat index i = (l * M + m) * C + c in x [L, M, C] (int64), else
    0 (module docstring, 'Prompt dropout')."""
    offsets = (l.to(tl.int64) * M + o_m[:, None]) * C + o_c[None, :]
    return tl.where(tl.rand(tl.load(SEED), offsets) >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _load_x(p_x, SEED, l, M, C, o_m, m_m, o_c, m_c, p_drop, DROPOUT: tl.constexpr):
    """x [BLOCK_M, BLOCK_C] fp32 of rows p_x (channels o_c at unit stride; 0 outside the masks), dropped out with
    DROPOUT (``_dropout_scale``)."""
    b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_m[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    if DROPOUT:
        b_x *= _dropout_scale(SEED, l, M, C, o_m, o_c, p_drop)
    return b_x


@triton.jit
def _row_stats(p_x, SEED, l, M, C, o_m, m_m, eps, p_drop, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, rstd) [BLOCK_M] fp32 of the rows p_x (``_load_x``): the variance from a second pass."""
    b_sum = tl.zeros([p_x.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        b_sum += tl.sum(_load_x(p_x, SEED, l, M, C, o_m, m_m, o_c, o_c < C, p_drop, DROPOUT), 1)
    b_mean = b_sum / C
    b_var = tl.zeros([p_x.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_d = tl.where(m_m[:, None] & m_c[None, :],
                       _load_x(p_x, SEED, l, M, C, o_m, m_m, o_c, m_c, p_drop, DROPOUT) - b_mean[:, None], 0.0)
        b_var += tl.sum(b_d * b_d, 1)
    return b_mean, 1.0 / tl.sqrt(b_var / C + eps)


@triton.jit
def _kv_offsets(o_m, o_r, M, R, P, D, l):
    """Offsets in [L, T, 2H, P, D] of rows o_m (m = t * P + p) and columns o_r (r = (s * H + h) * D + d)."""
    return l * M * R + ((o_m // P) * P * R + o_m % P * D)[:, None] + ((o_r // D) * P * D + o_r % D)[None, :]


@triton.jit
def _kv_fwd_kernel(X, TABLE, SEED, OUT, MEAN, RSTD, M, x_rows, C, R, k_row0, v_row0, kb_row0, vb_row0, P, D, eps,
                   p_drop, stride_xl, stride_xm,
                   NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Program (l, i_m, i_r): kv rows i_m, columns i_r of layer l (module docstring) of x dropped out with DROPOUT
    (``_dropout_scale``); with NORM the program of column block 0 also writes the rows' mean and rstd ([L, M] fp32)
    of the dropped-out x. Row m reads x's row m % x_rows (x_rows < M: the sets share x's rows, each set its own
    mask)."""
    l = tl.program_id(0)
    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m, m_r = o_m < M, o_r < R
    p_x = X + l * stride_xl + (o_m % x_rows) * stride_xm  # [BLOCK_M] row pointers
    p_w = _kv_rows(TABLE, l, 0, o_r, R // 2, k_row0, v_row0, C, X)  # [BLOCK_R] row starts
    if NORM:
        b_mean, b_rstd = _row_stats(p_x, SEED, l, M, C, o_m, m_m, eps, p_drop, DROPOUT, BLOCK_C)
        if tl.program_id(2) == 0:
            tl.store(MEAN + l * M + o_m, b_mean, mask=m_m)
            tl.store(RSTD + l * M + o_m, b_rstd, mask=m_m)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_h = _load_x(p_x, SEED, l, M, C, o_m, m_m, o_c, m_c, p_drop, DROPOUT)
        if NORM:
            b_h = (b_h - b_mean[:, None]) * b_rstd[:, None]
            if HAS_W:
                b_h *= tl.load(_pointer(TABLE, l, 2, X) + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                b_h += tl.load(_pointer(TABLE, l, 3, X) + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        b_w = tl.load(p_w[:, None] + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BLOCK_R, C]
        acc = tl.dot(b_h.to(b_w.dtype), tl.trans(b_w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(_kv_rows(TABLE, l, 4, o_r, R // 2, kb_row0, vb_row0, 1, X), mask=m_r,
                       other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + _kv_offsets(o_m, o_r, M, R, P, D, l), acc.to(OUT.dtype.element_ty),
             mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _grad_h(G, X, TABLE, o_m, m_m, o_c, m_c, M, C, R, k_row0, v_row0, P, D, l, PRECISION: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """(g [W_k ; W_v])[rows o_m, channels o_c] of layer l: [BLOCK_M, BLOCK_C] fp32, over R in blocks."""
    acc = tl.zeros([o_m.shape[0], o_c.shape[0]], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_g = tl.load(G + _kv_offsets(o_m, o_r, M, R, P, D, l), mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_w = _kv_rows(TABLE, l, 0, o_r, R // 2, k_row0, v_row0, C, X)  # [BLOCK_R] row starts
        b_w = tl.load(p_w[:, None] + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
        acc = tl.dot(b_g.to(b_w.dtype), b_w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _kv_bwd_kernel(G, X, TABLE, SEED, MEAN, RSTD, DX, M, x_rows, C, R, k_row0, v_row0, P, D, p_drop, stride_xl,
                   stride_xm, NORM: tl.constexpr, HAS_W: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (l, i_x, g): dx ([G, L, x_rows, C] contiguous, G the grid's third size) of x's rows i_x of layer l,
    summed over the rows m that read each (row m reads x's row m % x_rows: one, unless the sets share x's rows) of
    the sets t = g, g + G, ... (the program adds them in order, and the caller the G partials: deterministic).
    Per row m: with NORM, a first pass over C takes the row sums of dn = dh * w and dn * xhat that the norm's
    backward needs, a second recomputes dn and makes dx = rstd * (dn - (sum dn + xhat * sum dn * xhat) / C);
    without, dx = dh. With DROPOUT, x is the forward's
    dropped-out x (the same multipliers, ``_dropout_scale``) and dx is multiplied by them."""
    l, g, groups = tl.program_id(0), tl.program_id(2), tl.num_programs(2)
    o_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_x < x_rows
    p_x = X + l * stride_xl + o_x * stride_xm
    p_dx = DX + (g * tl.num_programs(0) + l).to(tl.int64) * x_rows * C + o_x * C
    for t in range(g, M // x_rows, groups):  # the rows m = t * x_rows + o_x that read these rows of x
        o_m = t * x_rows + o_x
        if NORM:
            b_mean = tl.load(MEAN + l * M + o_m, mask=m_m, other=0.0)
            b_rstd = tl.load(RSTD + l * M + o_m, mask=m_m, other=0.0)
            b_dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            b_dxsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = o_c < C
                b_dn = _grad_h(G, X, TABLE, o_m, m_m, o_c, m_c, M, C, R, k_row0, v_row0, P, D, l, PRECISION,
                               BLOCK_R)
                if HAS_W:
                    b_dn *= tl.load(_pointer(TABLE, l, 2, X) + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
                b_x = _load_x(p_x, SEED, l, M, C, o_m, m_m, o_c, m_c, p_drop, DROPOUT)
                b_dsum += tl.sum(b_dn, 1)
                b_dxsum += tl.sum(b_dn * (b_x - b_mean[:, None]) * b_rstd[:, None], 1)
        tl.debug_barrier()  # the previous row's dx stores, read back below
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            m_mc = m_m[:, None] & m_c[None, :]
            b_dx = _grad_h(G, X, TABLE, o_m, m_m, o_c, m_c, M, C, R, k_row0, v_row0, P, D, l, PRECISION, BLOCK_R)
            if DROPOUT:
                b_scale = _dropout_scale(SEED, l, M, C, o_m, o_c, p_drop)
            if NORM:
                if HAS_W:
                    b_dx *= tl.load(_pointer(TABLE, l, 2, X) + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
                b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_mc, other=0.0).to(tl.float32)
                if DROPOUT:
                    b_x *= b_scale
                b_xhat = (b_x - b_mean[:, None]) * b_rstd[:, None]
                b_dx = b_rstd[:, None] * (b_dx - (b_dsum[:, None] + b_xhat * b_dxsum[:, None]) / C)
            if DROPOUT:
                b_dx *= b_scale
            if t > g:
                b_dx += tl.load(p_dx[:, None] + o_c[None, :], mask=m_mc, other=0.0).to(tl.float32)
            tl.store(p_dx[:, None] + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_mc)


# ------------------------------------------------------------------------------------------- launchers


def forget_plans():
    """Drop the cached launch plans (after an edit of LAUNCH)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def _options(kernel: str) -> tuple[tuple[int, int, int], dict]:
    launch_ = LAUNCH[kernel]
    return ((launch_["BLOCK_M"], launch_["BLOCK_R"], launch_["BLOCK_C"]),
            dict(num_warps=launch_["num_warps"], num_stages=launch_["num_stages"]))


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # 16-bit operands: their own dtype (the option unused)


@functools.cache
def _forward_plan(shape, strides, dtype, sets, heads, head_dim, rows, eps, norm, has_w, has_b, has_bias, p_drop,
                  shared):
    """``_kv_fwd_kernel`` on x of ``shape`` [L, x_rows, C] and (layer, row) ``strides`` (``shared``: the sets share
    x's rows, M = sets * x_rows; else M = x_rows), with the key and value blocks' first rows ``rows``
    (``forward``) and prompt dropout ``p_drop`` (0: none): (grid, args, options, the shapes of kv [L, T, 2, H, P, D]
    and of mean/rstd [L, M])."""
    L, x_rows, C = shape
    M = sets * x_rows if shared else x_rows
    R, P = 2 * heads * head_dim, M // sets
    blocks, options = _options("fwd")
    args = (M, x_rows, C, R, *rows, P, head_dim, eps, p_drop, strides[0], strides[1], norm, has_w, has_b, has_bias,
            p_drop > 0, _precision(dtype), *blocks)
    grid = (L, cdiv(M, blocks[0]), cdiv(R, blocks[1]))
    return grid, args, options, (L, sets, 2, heads, P, head_dim), (L, M)


@functools.cache
def _backward_plan(shape, strides, dtype, sets, heads, head_dim, weight_rows, norm, has_w, p_drop, shared):
    """``_kv_bwd_kernel``: (grid, args, options); the grid's third size is the number of dx partials (sets that
    share x's rows: ``SET_GROUPS`` at most, so that the samples' work spreads over that many times the programs)."""
    L, x_rows, C = shape
    M = sets * x_rows if shared else x_rows
    blocks, options = _options("bwd")
    args = (M, x_rows, C, 2 * heads * head_dim, *weight_rows, M // sets, head_dim, p_drop, strides[0], strides[1],
            norm, has_w, p_drop > 0, _precision(dtype), *blocks)
    return (L, cdiv(x_rows, blocks[0]), min(sets, SET_GROUPS) if shared else 1), args, options


def forward(x: torch.Tensor, layers: KVLayers, seed: torch.Tensor | None = None, p_drop: float = 0.0):
    """kv [L, sets, 2, heads, P, head_dim] in x's dtype, and mean, rstd [L, M] fp32 (None without a norm) of x
    [L, M, C] (M = sets * P; unit stride on C; with ``layers.shared``, x [L, P, C], the rows every set reads, each
    set dropped out with its own mask) through ``layers``, x dropped out with probability ``p_drop`` (> 0: with the
    multipliers of ``seed``, ``dropout_seed``; module docstring, 'Prompt dropout')."""
    norm = layers.eps is not None
    grid, args, options, kv_shape, stats_shape = _forward_plan(
        x.shape, x.stride()[:2], x.dtype, layers.sets, layers.heads, layers.head_dim, layers.rows,
        layers.eps if norm else 0.0, norm, layers.has_w, layers.has_b, layers.has_bias, p_drop, layers.shared)
    device = x.device
    kv = torch.empty(kv_shape, dtype=x.dtype, device=device)
    mean = torch.empty(stats_shape, dtype=torch.float32, device=device) if norm else None
    rstd = torch.empty(stats_shape, dtype=torch.float32, device=device) if norm else None
    launch(_kv_fwd_kernel, grid, (x, layers.table, seed if p_drop else None), (kv, mean, rstd), args, options)
    return kv, mean, rstd


def backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor | None,
             layers: KVLayers, seed: torch.Tensor | None = None, p_drop: float = 0.0) -> torch.Tensor:
    """dx of x's shape, contiguous, in x's dtype, of grad ([L, sets, 2, heads, P, head_dim], made contiguous) through
    ``forward``'s ``layers`` (mean, rstd, seed and p_drop: its): the gradient of x itself (before the dropout; with
    ``layers.shared`` summed over the sets, in fp32 in the kernel, then cast)."""
    grid, args, options = _backward_plan(x.shape, x.stride()[:2], x.dtype, layers.sets, layers.heads,
                                         layers.head_dim, layers.rows[:2], mean is not None, layers.has_w, p_drop,
                                         layers.shared)
    shared = layers.shared and layers.sets > 1
    dx = torch.empty((grid[2], *x.shape), dtype=torch.float32 if shared else x.dtype, device=x.device)
    launch(_kv_bwd_kernel, grid, (grad.contiguous(), x, layers.table, seed if p_drop else None, mean, rstd), (dx,),
           args, options)
    dx = dx.sum(0) if grid[2] > 1 else dx[0]  # the sets' partials, in order
    return dx if dx.dtype == x.dtype else dx.to(x.dtype)
