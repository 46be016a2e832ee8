"""Triton kernels of ``match_select`` (matching, top-k, loss terms, and the fused LayerNorm; the math is in that
module's docstring) and their launchers, one kernel launch each. Imported only on the triton backend.

Their dot products (x . keys forward; the same, g . khat and g^T . x backward) run on tensor cores with fp32
accumulation, at a precision that keeps the fp32 ranking (``_precise_dot``): fp32 operands as 3xTF32, a 16-bit x
(exact in its dtype) against the fp32 operand split into a high and a low 16-bit part. Measured against an fp64
ranking with ``benchmarks/matching_accuracy.py``. Norms, the selection and the loss terms are fp32 on CUDA cores.
"""

import functools

import torch
import triton
import triton.language as tl

from tcpa_kernels._backend import cdiv, next_power_of_2, sm_count
from tcpa_kernels.ops._launch import launch
from tcpa_kernels.ops._selection_kernels import own_pool, row_layout, select_topk
from tcpa_kernels.ops.match_select import group_weights
from tcpa_kernels.ops.selection import max_topk

# Tokens per block, channels per step of the loop over C, warps, stages: chosen offline from the sm_90 compile
# report (fp32 and bf16 x, 64 entries, with and without the fused LayerNorm: tiles ptxas fits without spilling, the
# forward's dots as warpgroup MMAs; tests/compile_sm90.py checks them). Not timed on a GPU yet.
LAUNCH = {"fwd": dict(BLOCK_T=64, BLOCK_C=32, num_warps=8, num_stages=1),
          "bwd": dict(BLOCK_T=32, BLOCK_C=16, num_warps=8, num_stages=1)}
MAX_KEY_PARTIALS = 128  # backward programs off CUDA (on CUDA: one per SM), each writing one fp32 [E, C] partial


@triton.jit
def _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
             BLOCK_C: tl.constexpr, E_PAD: tl.constexpr, X16: tl.constexpr):
    """cos [BLOCK_T, E_PAD] of rows o_t against every key, |x| [BLOCK_T] and |k| [E_PAD] (fp32, unclamped), and
    the row sums of x [BLOCK_T] (for the fused layer norm's mean). The dot products on tensor cores
    (``_precise_dot``): x in its 16-bit dtype with X16, else in fp32."""
    p_x = X + (o_t // N) * stride_b + (o_t % N) * stride_n  # [BLOCK_T] row pointers
    o_e = tl.arange(0, E_PAD)
    b_dot = tl.zeros([o_t.shape[0], E_PAD], dtype=tl.float32)
    b_xsq = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    b_ksq = tl.zeros([E_PAD], dtype=tl.float32)
    b_xsum = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_x_in = _load_x(p_x, o_c, m_t[:, None] & m_c[None, :], X16)  # [BLOCK_T, BLOCK_C]
        b_x = b_x_in.to(tl.float32)
        b_k = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img)  # [E_PAD, BLOCK_C]
        b_dot = _precise_dot(b_x_in, tl.trans(b_k), b_dot)
        b_xsq += tl.sum(b_x * b_x, 1)
        b_ksq += tl.sum(b_k * b_k, 1)
        b_xsum += tl.sum(b_x, 1)
    b_xnorm, b_knorm = tl.sqrt(b_xsq), tl.sqrt(b_ksq)
    b_cos = b_dot / (tl.maximum(b_xnorm, 1e-12)[:, None] * tl.maximum(b_knorm, 1e-12)[None, :])
    return b_cos, b_xnorm, b_knorm, b_xsum


@triton.jit
def _load_x(p_x, o_c, m_tc, X16: tl.constexpr):
    """Rows p_x [BLOCK_T] of x, channels o_c: in x's dtype with X16 (a 16-bit x), else fp32."""
    b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0)
    return b_x if X16 else b_x.to(tl.float32)


@triton.jit
def _precise_dot(a, b, acc):
    """acc + a @ b (fp32 acc) on tensor cores at about fp32 accuracy. Both operands fp32: 3xTF32 (each operand as a
    TF32 high part plus a TF32 low part, three MMAs). One 16-bit operand (exact in its dtype) and one fp32: the fp32
    one as a high plus a low part in the 16-bit dtype, two MMAs of that dtype."""
    if a.dtype == tl.float32:
        if b.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        a_hi = a.to(b.dtype)
        acc = tl.dot(a_hi, b, acc)
        return tl.dot((a - a_hi.to(tl.float32)).to(b.dtype), b, acc)
    b_hi = b.to(a.dtype)
    acc = tl.dot(a, b_hi, acc)
    return tl.dot(a, (b - b_hi.to(tl.float32)).to(a.dtype), acc)


@triton.jit
def _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img):
    """Keys e = o_e (CLS pool, then image pool), channels o_c: fp32 [E_PAD, BLOCK_C], 0 past the pools."""
    m_cls = (o_e < pool_cls)[:, None] & m_c[None, :]
    m_img = ((o_e >= pool_cls) & (o_e < pool_cls + pool_img))[:, None] & m_c[None, :]
    b_cls = tl.load(KEYS_CLS + o_e[:, None] * C + o_c[None, :], mask=m_cls, other=0.0)
    b_img = tl.load(KEYS_IMG + (o_e - pool_cls)[:, None] * C + o_c[None, :], mask=m_img, other=0.0)
    return b_cls.to(tl.float32) + b_img.to(tl.float32)


@triton.jit
def _layer_norm_rows(X, NORM_W, NORM_B, H, MEAN, RSTD, o_t, m_t, N, C, stride_b, stride_n, b_mean, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """h = (x - mean) * rstd * w + b of rows o_t into H ([B*N, C] contiguous), mean and rstd ([B*N] fp32): the
    variance in a second pass over the (cached) rows, as x - mean, not E[x^2] - mean^2."""
    p_x = X + (o_t // N) * stride_b + (o_t % N) * stride_n
    b_var = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_tc = m_t[:, None] & (o_c < C)[None, :]
        b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        b_xc = tl.where(m_tc, b_x - b_mean[:, None], 0.0)
        b_var += tl.sum(b_xc * b_xc, 1)
    b_rstd = 1.0 / tl.sqrt(b_var / C + eps)  # [BLOCK_T]
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_tc = m_t[:, None] & m_c[None, :]
        b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        b_h = (b_x - b_mean[:, None]) * b_rstd[:, None]
        if HAS_W:
            b_h *= tl.load(NORM_W + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            b_h += tl.load(NORM_B + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        tl.store(H + o_t[:, None] * C + o_c[None, :], b_h.to(H.dtype.element_ty), mask=m_tc)
    tl.store(MEAN + o_t, b_mean, mask=m_t)
    tl.store(RSTD + o_t, b_rstd, mask=m_t)


@triton.jit
def _task_keys(KEYS_CLS, KEYS_IMG, TASKS, i_b, pool_cls, pool_img, C):
    """The key pointers of sample i_b's set of a bank of key sets ([T, pool_cls, C] and [T, pool_img, C])."""
    task = tl.load(TASKS + i_b).to(tl.int64)
    return KEYS_CLS + task * pool_cls * C, KEYS_IMG + task * pool_img * C


@triton.jit
def _match_fwd_kernel(X, KEYS_CLS, KEYS_IMG, TASKS, LAYOUTS, NORM_W, NORM_B, BITS, TERMS, H, MEAN, RSTD, n_rows, N,
                      C, stride_b, stride_n, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, k_max, w_cls, w_img,
                      eps, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_TASKS: tl.constexpr,
                      HAS_LAYOUTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, E_PAD: tl.constexpr,
                      X16: tl.constexpr):
    """Selection words and loss terms of a block of tokens; with NORM also the block's layer norm h (the same rows
    of x, read again from cache rather than by a second kernel). HAS_TASKS: a bank of key sets ([T, pool, C]),
    sample b matching set TASKS[b]; a block then holds the rows of one sample only (cdiv(N, BLOCK_T) per sample).
    HAS_LAYOUTS: each sample's own pools and k (LAYOUTS [B, 6], ``row_layout``), w_cls / w_img the weights of k = 1
    (divided by the row's k)."""
    if HAS_TASKS:
        n_blocks = tl.cdiv(N, BLOCK_T)
        i_b = (tl.program_id(0) // n_blocks).to(tl.int64)
        KEYS_CLS, KEYS_IMG = _task_keys(KEYS_CLS, KEYS_IMG, TASKS, i_b, pool_cls, pool_img, C)
        o_n = (tl.program_id(0) % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        o_t = i_b * N + o_n  # [BLOCK_T] row = b*N + n
        m_t = o_n < N
    else:
        o_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row = b*N + n
        m_t = o_t < n_rows
    b_cos, _, _, b_xsum = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
                                   BLOCK_C, E_PAD, X16)
    own_cls, own_img, kc, ki = row_layout(LAYOUTS, o_t, m_t, N, pool_cls, pool_img, k_cls, k_img, HAS_LAYOUTS)
    is_prefix, m_valid, k_row = own_pool(o_t, N, num_prefix_tokens, pool_cls, own_cls, own_img, kc, ki, E_PAD)
    b_bits, sel = select_topk(b_cos, m_valid, k_row, k_max)
    b_terms = tl.sum(tl.where(sel, 1.0 - b_cos, 0.0), 1) * _row_weights(is_prefix, k_row, w_cls, w_img, HAS_LAYOUTS)
    tl.store(BITS + o_t, b_bits, mask=m_t)
    tl.store(TERMS + o_t, b_terms, mask=m_t)
    if NORM:
        _layer_norm_rows(X, NORM_W, NORM_B, H, MEAN, RSTD, o_t, m_t, N, C, stride_b, stride_n, b_xsum / C, eps,
                         HAS_W, HAS_B, BLOCK_C)


@triton.jit
def _row_weights(is_prefix, k_row, w_cls, w_img, HAS_LAYOUTS: tl.constexpr):
    """w_t of rows [BLOCK_T]: their group's weight, over the row's own k with HAS_LAYOUTS (w_cls / w_img then being
    the weights of k = 1)."""
    w = tl.where(is_prefix, w_cls, w_img)
    if HAS_LAYOUTS:  # resolved at compile time: one return type
        w = w / k_row.to(tl.float32)
    return w


@triton.jit
def _match_bwd_kernel(X, KEYS_CLS, KEYS_IMG, TASKS, LAYOUTS, BITS, DTERMS, NORM_W, DH, MEAN, RSTD, DRES, DX,
                      DKEYS_PARTIAL, n_rows, N, C, stride_b, stride_n, dstride_b, dstride_n, num_prefix_tokens,
                      pool_cls, pool_img, k_cls, k_img, w_cls, w_img, NEED_DX: tl.constexpr, NEED_DKEYS: tl.constexpr,
                      NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_TASKS: tl.constexpr,
                      HAS_LAYOUTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, E_PAD: tl.constexpr,
                      X16: tl.constexpr):
    """Program i_p handles token blocks i_p, i_p + n_programs, ...; dx [B, N, C] contiguous, partial [E, C] fp32.
    HAS_TASKS (a bank of key sets, sample b matching set TASKS[b]): program i_p handles sample i_p's blocks, and its
    partial is that sample's key gradient (the caller sums them per set). With NORM, dx also gets the layer norm's
    input gradient from dh ([B*N, C] contiguous): rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dh * w,
    xhat = (x - mean) * rstd. With HAS_RES, dx also gets DRES ([B*N, C] contiguous): the gradient the residual
    stream passes around the block's attention (added in fp32 before dx is rounded to its dtype)."""
    i_p = tl.program_id(0)
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < pool_cls + pool_img
    if NEED_DKEYS:  # else DKEYS_PARTIAL is None, as DX is without NEED_DX
        p_partial = DKEYS_PARTIAL + i_p.to(tl.int64) * (pool_cls + pool_img) * C + o_e[:, None] * C
    if HAS_TASKS:  # this sample's rows b*N .. b*N + N - 1, block by block
        KEYS_CLS, KEYS_IMG = _task_keys(KEYS_CLS, KEYS_IMG, TASKS, i_p.to(tl.int64), pool_cls, pool_img, C)
        row_start = i_p.to(tl.int64) * N
        row_end = row_start + N
        first_blk = 0
        end_blk = tl.cdiv(N, BLOCK_T)
        blk_step = 1
    else:  # every n_programs-th block of all rows
        row_start = tl.zeros([], dtype=tl.int64)
        row_end = n_rows
        first_blk = i_p
        end_blk = tl.cdiv(n_rows, BLOCK_T)
        blk_step = tl.num_programs(0)
    for i_blk in range(first_blk, end_blk, blk_step):
        o_t = row_start + i_blk * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T] row = b*N + n
        m_t = o_t < row_end
        b_cos, b_xnorm, b_knorm, _ = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls,
                                              pool_img, BLOCK_C, E_PAD, X16)
        _, _, kc, ki = row_layout(LAYOUTS, o_t, m_t, N, pool_cls, pool_img, k_cls, k_img, HAS_LAYOUTS)
        is_prefix = (o_t % N) < num_prefix_tokens
        b_w = _row_weights(is_prefix, tl.where(is_prefix, kc, ki), w_cls, w_img, HAS_LAYOUTS)  # [BLOCK_T]
        b_bits = tl.load(BITS + o_t, mask=m_t, other=0)  # [BLOCK_T] int64
        sel = ((b_bits[:, None] >> o_e[None, :].to(tl.int64)) & 1) != 0
        b_dterm = tl.load(DTERMS + (o_t // N) * dstride_b + (o_t % N) * dstride_n, mask=m_t, other=0.0)
        b_g = tl.where(sel & m_t[:, None], -(b_dterm * b_w)[:, None], 0.0)  # dL/dcos
        b_gcos = b_g * b_cos  # [BLOCK_T, E_PAD]
        b_inv_x = 1.0 / tl.maximum(b_xnorm, 1e-12)  # [BLOCK_T]
        b_xcoef = tl.where(b_xnorm > 1e-12, tl.sum(b_gcos, 1) * b_inv_x * b_inv_x, 0.0)  # clamped norm: no x term
        b_kdot = tl.sum(b_gcos, 0)  # [E_PAD] this block's dkhat_e . khat_e
        b_inv_k = 1.0 / tl.maximum(b_knorm, 1e-12)  # [E_PAD]
        p_x = X + (o_t // N) * stride_b + (o_t % N) * stride_n
        if NORM:
            b_mean = tl.load(MEAN + o_t, mask=m_t, other=0.0)
            b_rstd = tl.load(RSTD + o_t, mask=m_t, other=0.0)
            b_gsum, b_gxsum = _layer_norm_grad_sums(X, NORM_W, DH, o_t, m_t, p_x, C, b_mean, b_rstd, HAS_W, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            m_tc = m_t[:, None] & m_c[None, :]
            b_x_in = _load_x(p_x, o_c, m_tc, X16)  # [BLOCK_T, BLOCK_C]
            b_x = b_x_in.to(tl.float32)
            b_khat = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img) * b_inv_k[:, None]
            if NEED_DX:
                b_dx = _precise_dot(b_g, b_khat, tl.zeros(b_x.shape, dtype=tl.float32)) * b_inv_x[:, None]
                b_dx -= b_xcoef[:, None] * b_x
                if NORM:
                    b_gn = _norm_upstream(NORM_W, DH, o_t, o_c, m_c, m_tc, C, HAS_W)  # [BLOCK_T, BLOCK_C]
                    b_xhat = (b_x - b_mean[:, None]) * b_rstd[:, None]
                    b_dx += b_rstd[:, None] * (b_gn - (b_gsum[:, None] + b_xhat * b_gxsum[:, None]) / C)
                if HAS_RES:
                    b_dx += tl.load(DRES + o_t[:, None] * C + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
                tl.store(DX + o_t[:, None] * C + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_tc)
            if NEED_DKEYS:
                b_dkhat = _precise_dot(tl.trans(b_g * b_inv_x[:, None]), b_x_in,
                                       tl.zeros([E_PAD, BLOCK_C], dtype=tl.float32))  # [E_PAD, BLOCK_C]
                b_dk = (b_dkhat - b_kdot[:, None] * b_khat) * b_inv_k[:, None]
                m_ec = m_e[:, None] & m_c[None, :]
                if i_blk != first_blk:  # later blocks add to this program's partial
                    b_dk += tl.load(p_partial + o_c[None, :], mask=m_ec, other=0.0)
                tl.store(p_partial + o_c[None, :], b_dk, mask=m_ec)


@triton.jit
def _norm_upstream(NORM_W, DH, o_t, o_c, m_c, m_tc, C, HAS_W: tl.constexpr):
    """g = dh * w of rows o_t, channels o_c: fp32 [BLOCK_T, BLOCK_C]."""
    b_g = tl.load(DH + o_t[:, None] * C + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
    if HAS_W:
        b_g *= tl.load(NORM_W + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return b_g


@triton.jit
def _layer_norm_grad_sums(X, NORM_W, DH, o_t, m_t, p_x, C, b_mean, b_rstd, HAS_W: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Row sums of g and of g * xhat (g = dh * w, xhat = (x - mean) * rstd): [BLOCK_T] each."""
    b_gsum = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    b_gxsum = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_tc = m_t[:, None] & m_c[None, :]
        b_g = _norm_upstream(NORM_W, DH, o_t, o_c, m_c, m_tc, C, HAS_W)
        b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        b_gsum += tl.sum(b_g, 1)
        b_gxsum += tl.sum(b_g * (b_x - b_mean[:, None]) * b_rstd[:, None], 1)
    return b_gsum, b_gxsum


# ------------------------------------------------------------------------------------------- launchers


# Launch plans: (grid, the arguments after the pointers in the kernel's order, constexprs included, the launch
# options, and the shapes of the buffers to allocate, as tuples: torch.empty parses a torch.Size more slowly) of one
# launch, computed once per shape, strides, pool layout and flags (never from a tensor's values), from LAUNCH and
# MAX_KEY_PARTIALS as they are then: who edits those at run time calls forget_plans().


def forget_plans():
    """Drop the cached launch plans (after an edit of LAUNCH or MAX_KEY_PARTIALS)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def _constexprs_and_options(kernel, pool_cls, pool_img, x16):
    """(BLOCK_T, BLOCK_C, E_PAD, X16) of ``kernel`` ('fwd' | 'bwd') and its launch options (E_PAD >= 16: tl.dot)."""
    launch = LAUNCH[kernel]
    e_pad = max(16, next_power_of_2(pool_cls + pool_img))
    return (launch["BLOCK_T"], launch["BLOCK_C"], e_pad, x16), dict(num_warps=launch["num_warps"],
                                                                    num_stages=launch["num_stages"])


def _x16(x):
    """The kernels' X16: x's own 16-bit dtype in the dot products (fp16; bf16 on CUDA: the interpreter's bf16
    dots are wrong, so off CUDA bf16 x takes the fp32 path)."""
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and x.device.type == "cuda")


@functools.cache
def _forward_plan(shape, strides, x16, pool_cls, pool_img, num_prefix_tokens, k_cls, k_img, eps, norm, has_w, has_b,
                  has_tasks, has_layouts):
    """``_match_fwd_kernel`` on x of ``shape`` and (batch, token) ``strides``: (grid, args, options, the shapes
    (B, N) of bits, terms, mean, rstd and (B, N, C) of h)."""
    B, N, C = shape
    w_cls, w_img = _weights(B, N, num_prefix_tokens, k_cls, k_img, has_layouts)
    k_max = max_topk(N, num_prefix_tokens, k_cls, k_img)
    blocks, options = _constexprs_and_options("fwd", pool_cls, pool_img, x16)
    args = (B * N, N, C, strides[0], strides[1], num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, k_max, w_cls,
            w_img, eps, norm, has_w, has_b, has_tasks, has_layouts, *blocks)
    programs = B * cdiv(N, blocks[0]) if has_tasks else cdiv(B * N, blocks[0])  # a bank: blocks of one sample
    return (programs,), args, options, (B, N), (B, N, C)


@functools.cache
def _backward_plan(shape, strides, dterms_strides, x16, sms, pool_cls, pool_img, num_prefix_tokens, k_cls, k_img,
                   need_dx, need_dkeys, norm, has_w, has_res, has_tasks, has_layouts):
    """``_match_bwd_kernel`` (dterms read at its own strides): (grid, args, options, the shapes of dx and of the
    key-gradient partials: one per program; with a bank one program, and partial, per sample)."""
    B, N, C = shape
    w_cls, w_img = _weights(B, N, num_prefix_tokens, k_cls, k_img, has_layouts)
    blocks, options = _constexprs_and_options("bwd", pool_cls, pool_img, x16)
    args = (B * N, N, C, strides[0], strides[1], dterms_strides[0], dterms_strides[1], num_prefix_tokens, pool_cls,
            pool_img, k_cls, k_img, w_cls, w_img, need_dx, need_dkeys, norm, has_w, has_res, has_tasks, has_layouts,
            *blocks)
    programs = B if has_tasks else backward_programs(B * N, sms)
    return (programs,), args, options, (B, N, C), (programs, pool_cls + pool_img, C)


def forward(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens,
            k_cls, k_img):
    """One launch of ``_match_fwd_kernel``: (terms, bits, h, mean, rstd) as ``match_select.match_fwd`` returns,
    with None for h, mean and rstd without ``fuse_norm``. The keys are contiguous (the callers see to it): [pool, C]
    each, or with tasks (int [B]) a bank's [T, pool, C]."""
    strides = x.stride()
    if strides[-1] != 1:
        x = x.contiguous()
        strides = x.stride()
    grid, args, options, rows, shape = _forward_plan(
        x.shape, strides, _x16(x), keys_cls.shape[-2], keys_img.shape[-2], num_prefix_tokens, k_cls, k_img, norm_eps,
        fuse_norm, norm_weight is not None, norm_bias is not None, tasks is not None, layouts is not None)
    device = x.device
    bits = torch.empty(rows, dtype=torch.int64, device=device)
    terms = torch.empty(rows, dtype=torch.float32, device=device)
    h = mean = rstd = None
    if fuse_norm:  # the layer norm's output h [B, N, C] in x's dtype, mean and rstd [B, N] fp32
        h = torch.empty(shape, dtype=x.dtype, device=device)
        mean = torch.empty(rows, dtype=torch.float32, device=device)
        rstd = torch.empty(rows, dtype=torch.float32, device=device)
    if grid[0]:
        launch(_match_fwd_kernel, grid, (x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias),
               (bits, terms, h, mean, rstd), args, options)
    return terms, bits, h, mean, rstd


def _weights(B, N, num_prefix_tokens, k_cls, k_img, has_layouts):
    """The kernels' (w_cls, w_img): ``group_weights``, of k = 1 with per-sample layouts (the kernels divide by the
    row's k)."""
    if has_layouts:
        k_cls = k_img = 1
    return group_weights(B, N, num_prefix_tokens, k_cls, k_img)


def backward_programs(n_rows, sms):
    """Programs of the backward launch, each writing one key-gradient partial: one per block of rows, at most one
    per SM of the device (``sms``, from ``sm_count``; MAX_KEY_PARTIALS where it is None, off CUDA)."""
    return max(1, min(cdiv(n_rows, LAUNCH["bwd"]["BLOCK_T"]), sms or MAX_KEY_PARTIALS))


def backward(dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd, num_prefix_tokens,
             k_cls, k_img, need_dx, need_dkeys):
    """One launch of ``_match_bwd_kernel``: (dx, key-gradient partials) as ``match_select.match_bwd`` returns, with
    None for what is not needed; dres (or None) a residual gradient dx includes. The keys are contiguous (the callers
    see to it), a bank's with tasks."""
    strides = x.stride()
    if strides[-1] != 1:
        x = x.contiguous()
        strides = x.stride()
    device = x.device
    grid, args, options, shape, partials_shape = _backward_plan(
        x.shape, strides, dterms.stride(), _x16(x), sm_count(device), keys_cls.shape[-2], keys_img.shape[-2],
        num_prefix_tokens, k_cls, k_img, need_dx, need_dkeys, dh is not None, norm_weight is not None,
        dres is not None, tasks is not None, layouts is not None)
    dx = torch.empty(shape, dtype=x.dtype, device=device) if need_dx else None
    partials = torch.empty(partials_shape, dtype=torch.float32, device=device) if need_dkeys else None
    if args[0]:  # B * N rows
        launch(_match_bwd_kernel, grid, (x, keys_cls, keys_img, tasks, layouts, bits, dterms, norm_weight,
                                         None if dh is None else dh.contiguous(), mean, rstd,
                                         None if dres is None else dres.contiguous()), (dx, partials), args, options)
    elif need_dkeys:
        partials.zero_()
    return dx, partials
