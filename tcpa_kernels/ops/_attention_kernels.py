"""Triton kernels of prompt-augmented attention (TCPA_SPEC.md §3, KERNEL_NOTES.md).

Forward: one program per (batch*head, query block). Online softmax over the N token keys, then over
the P prompt keys. Every prompt score enters the running max and the normaliser; only selected prompts
enter the accumulator (renormalize=False). With renormalize=True unselected prompts get -inf.
Token keys go first so the running max is finite before any all-masked prompt block is seen.
Saves lse (log2 units) per query row.

Backward (FlashAttention-2 recomputation), with p = exp2(s*log2e - lse), dP = dO.v, delta = dO.O:
  ds = p * (m*dP - delta)     renormalize=False  (unselected prompts still get a key gradient)
  ds = m*p * (dP - delta)     renormalize=True
  dv = sum_rows (m*p) dO,  dq = scale * sum ds k,  dk = scale * sum_rows ds q      (m = 1 for tokens)
Two launches:
- ``_bwd_dq_kernel``  per query block: computes and stores delta, then dq.
- ``_bwd_dkdv_kernel`` per key block: axis 1 of its grid covers the token key blocks, then the prompt key blocks
  (a runtime branch on the program id). Prompt K/V shared by the batch ([H, P, D]) need a reduction over the
  batch: the kernel writes per-(b, h) fp32 partials that the caller sums (deterministic), or adds fp32 atomics
  into [H, P, D].

Layouts: every [B, H, N, D] operand is addressed through its own (b, h, n) strides with unit stride on D: q/k/v
share one stride set, dq/dk/dv one, prompt K/V one ([H, P, D]: batch stride 0), prompt gradients one, o and do
one each. So timm's fused qkv ([B, N, 3, H, D]) is read in place, o is written as [B, N, H, D] (what the output
projection reads) and dq/dk/dv can go straight into one [B, N, 3, H, D] buffer. Prompt K/V may be stored in
another float dtype than q (fp32 prompts with 16-bit q): they are cast to q's dtype after the load. lse/delta are
contiguous [B*H, N] fp32. Offsets of the (batch, head) base are int64; the grid puts batch*head on axis 0
(up to 2^31-1).
"""

import torch
import triton
import triton.language as tl

from tcpa_kernels._backend import refuse_interpreter_bf16
from tcpa_kernels.ops._function import attention_grads, token_grad_buffers

LOG2E = 1.4426950408889634


@triton.jit
def _load_selection(MASK, BITS, i_b, o_m, o_p, m_m, m_p, N, P, n_cls_prompts, pool_cls, len_cls, len_img,
                    MASK_MODE: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: may query row o_m use prompt o_p (batch i_b)?"""
    if MASK_MODE == 0:  # explicit bool mask [B, N, P]
        p_mask = MASK + i_b * N * P + o_m[:, None].to(tl.int64) * P + o_p[None, :]
        sel = tl.load(p_mask, mask=m_m[:, None] & m_p[None, :], other=0) != 0
    else:  # selection words [B, N]: bit entry(p)
        b_bits = tl.load(BITS + i_b * N + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
        entry = tl.where(o_p < n_cls_prompts, o_p // len_cls, pool_cls + (o_p - n_cls_prompts) // len_img)
        sel = ((b_bits[:, None] >> entry[None, :].to(tl.int64)) & 1) != 0
    return sel


@triton.jit
def _grad_scores(b_p, b_dp, b_delta, sel, IS_PROMPT: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(probabilities that weight the values, dS) for one [BLOCK_M, BLOCK_N] tile."""
    b_pv = b_p
    b_dpm = b_dp
    if IS_PROMPT:
        b_pv = tl.where(sel, b_p, 0.0)
        b_dpm = tl.where(sel, b_dp, 0.0)
        if RENORMALIZE:
            b_p = b_pv
    return b_pv, b_p * (b_dpm - b_delta[:, None])


@triton.jit
def _query_block(H, N, D, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """This program's (batch*head, query block): int64 ids (i_bh, i_b, i_h), row/dim offsets and masks."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_d = tl.arange(0, D_PAD)
    m_md = m_m[:, None] & (o_d < D)[None, :]
    return i_bh, i_bh // H, i_bh % H, o_m, m_m, o_d, m_md


@triton.jit
def _rows(X, i_b, i_h, o_m, o_d, stride_b, stride_h, stride_n):
    """Pointers [BLOCK, D_PAD] to rows o_m of (batch i_b, head i_h) of a [B, H, N, D] tensor (unit stride on D)."""
    return X + i_b * stride_b + i_h * stride_h + o_m[:, None] * stride_n + o_d[None, :]


@triton.jit
def _key_block(b_q, K_BASE, V_BASE, stride_kn, start_n, n_keys, qk_scale,
               MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls, len_img, D,
               IS_PROMPT: tl.constexpr, MASK_MODE: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
               PRECISION: tl.constexpr):
    """Keys start_n.. of one range for a query block: k, v [BN, D_PAD]; scores [BM, BN] in log2 units, -inf past
    n_keys; selection (bool [BM, BN] for prompts, the column mask [1, BN] for tokens)."""
    o_d = tl.arange(0, D_PAD)
    o_n = start_n + tl.arange(0, BLOCK_N)
    m_n = o_n < n_keys
    m_kv = m_n[:, None] & (o_d < D)[None, :]
    # [BN, D_PAD] in q's dtype (prompts may be stored in another float dtype)
    b_k = tl.load(K_BASE + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0).to(b_q.dtype)
    b_v = tl.load(V_BASE + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0).to(b_q.dtype)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    sel = m_n[None, :]
    if IS_PROMPT:
        sel = _load_selection(MASK, BITS, i_b, o_m, o_n, m_m, m_n, N, P, n_cls_prompts, pool_cls, len_cls, len_img,
                              MASK_MODE)
    return b_k, b_v, b_s, sel


@triton.jit
def _fwd_key_range(acc, m_i, l_i, b_q, K_BASE, V_BASE, stride_kn, n_keys, qk_scale,
                   MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls, len_img, D,
                   IS_PROMPT: tl.constexpr, MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(0, n_keys, BLOCK_N):
        b_k, b_v, b_s, sel = _key_block(b_q, K_BASE, V_BASE, stride_kn, start_n, n_keys, qk_scale, MASK, BITS, i_b,
                                        o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls, len_img, D, IS_PROMPT,
                                        MASK_MODE, BLOCK_N, D_PAD, PRECISION)
        if IS_PROMPT:
            if RENORMALIZE:
                b_s = tl.where(sel, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(b_p, 1)  # every prompt counts in the normaliser
        b_p = tl.where(sel, b_p, 0.0)  # only selected prompts reach the output
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, MASK, BITS, O, LSE,
                stride_b, stride_h, stride_n, pstride_b, pstride_h, pstride_n, ostride_b, ostride_h, ostride_n,
                H, N, P, D, qk_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    i_bh, i_b, i_h, o_m, m_m, o_d, m_md = _query_block(H, N, D, BLOCK_M, D_PAD)
    qkv_base = i_b * stride_b + i_h * stride_h
    prompt_base = i_b * pstride_b + i_h * pstride_h
    b_q = tl.load(_rows(Q, i_b, i_h, o_m, o_d, stride_b, stride_h, stride_n), mask=m_md, other=0.0)  # [BM, D_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, b_q, K + qkv_base, V + qkv_base, stride_n, N, qk_scale,
                                   MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                                   len_img, D, False, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, b_q, PK + prompt_base, PV + prompt_base, pstride_n, P, qk_scale,
                                   MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                                   len_img, D, True, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    b_o = acc / l_i[:, None]  # [BM, D_PAD]
    tl.store(_rows(O, i_b, i_h, o_m, o_d, ostride_b, ostride_h, ostride_n), b_o.to(O.dtype.element_ty), mask=m_md)
    tl.store(LSE + i_bh * N + o_m, m_i + tl.log2(l_i), mask=m_m)


@triton.jit
def _bwd_dq_key_range(b_dq, b_q, b_do, b_lse, b_delta, K_BASE, V_BASE, stride_kn, n_keys, qk_scale,
                      MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls, len_img, D,
                      IS_PROMPT: tl.constexpr, MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(0, n_keys, BLOCK_N):
        b_k, b_v, b_s, sel = _key_block(b_q, K_BASE, V_BASE, stride_kn, start_n, n_keys, qk_scale, MASK, BITS, i_b,
                                        o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls, len_img, D, IS_PROMPT,
                                        MASK_MODE, BLOCK_N, D_PAD, PRECISION)
        b_p = tl.exp2(b_s - b_lse[:, None])  # [BM, BN], 0 past n_keys
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_pv, b_ds = _grad_scores(b_p, b_dp, b_delta, sel, IS_PROMPT, RENORMALIZE)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, PK, PV, MASK, BITS, O, DO, LSE, DELTA, DQ,
                   stride_b, stride_h, stride_n, pstride_b, pstride_h, pstride_n, ostride_b, ostride_h, ostride_n,
                   dostride_b, dostride_h, dostride_n, dstride_b, dstride_h, dstride_n,
                   H, N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                   MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    i_bh, i_b, i_h, o_m, m_m, o_d, m_md = _query_block(H, N, D, BLOCK_M, D_PAD)
    qkv_base = i_b * stride_b + i_h * stride_h
    prompt_base = i_b * pstride_b + i_h * pstride_h
    b_q = tl.load(_rows(Q, i_b, i_h, o_m, o_d, stride_b, stride_h, stride_n), mask=m_md, other=0.0)  # [BM, D_PAD]
    b_do = tl.load(_rows(DO, i_b, i_h, o_m, o_d, dostride_b, dostride_h, dostride_n), mask=m_md, other=0.0)
    b_o = tl.load(_rows(O, i_b, i_h, o_m, o_d, ostride_b, ostride_h, ostride_n), mask=m_md, other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)  # [BM]
    tl.store(DELTA + i_bh * N + o_m, b_delta, mask=m_m)
    b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.0)

    b_dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    b_dq = _bwd_dq_key_range(b_dq, b_q, b_do, b_lse, b_delta, K + qkv_base, V + qkv_base, stride_n, N,
                             qk_scale, MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                             len_img, D, False, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    b_dq = _bwd_dq_key_range(b_dq, b_q, b_do, b_lse, b_delta, PK + prompt_base, PV + prompt_base, pstride_n, P,
                             qk_scale, MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                             len_img, D, True, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    tl.store(_rows(DQ, i_b, i_h, o_m, o_d, dstride_b, dstride_h, dstride_n), (b_dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_md)


@triton.jit
def _bwd_dkdv_block(Q_BH, DO_BH, LSE_BH, DELTA_BH, KEYS, VALS, DKEYS, DVALS, MASK, BITS, i_b, start_n, n_keys,
                    stride_n, dostride_n, kstride_n, dkstride_n, N, P, D, qk_scale, sm_scale,
                    n_cls_prompts, pool_cls, len_cls, len_img,
                    IS_PROMPT: tl.constexpr, MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr,
                    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of keys start_n.. of one range (token keys, or prompt keys when IS_PROMPT) over every query row.
    The *_BH pointers and KEYS/VALS/DKEYS/DVALS point at this program's (batch, head)."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    m_n = o_n < n_keys
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    m_kv = m_n[:, None] & m_d[None, :]
    # [BN, D_PAD] in q's dtype (prompts may be stored in another float dtype)
    b_k = tl.load(KEYS + o_n[:, None] * kstride_n + o_d[None, :], mask=m_kv, other=0.0).to(Q_BH.dtype.element_ty)
    b_v = tl.load(VALS + o_n[:, None] * kstride_n + o_d[None, :], mask=m_kv, other=0.0).to(Q_BH.dtype.element_ty)

    b_dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(Q_BH + o_m[:, None] * stride_n + o_d[None, :], mask=m_md, other=0.0)  # [BM, D_PAD]
        b_do = tl.load(DO_BH + o_m[:, None] * dostride_n + o_d[None, :], mask=m_md, other=0.0)
        b_lse = tl.load(LSE_BH + o_m, mask=m_m, other=0.0)  # [BM]
        b_delta = tl.load(DELTA_BH + o_m, mask=m_m, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        b_p = tl.where(m_m[:, None] & m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        sel = m_n[None, :]
        if IS_PROMPT:
            sel = _load_selection(MASK, BITS, i_b, o_m, o_n, m_m, m_n, N, P, n_cls_prompts, pool_cls,
                                  len_cls, len_img, MASK_MODE)
        b_pv, b_ds = _grad_scores(b_p, b_dp, b_delta, sel, IS_PROMPT, RENORMALIZE)
        b_dv += tl.dot(tl.trans(b_pv.to(b_do.dtype)), b_do, input_precision=PRECISION)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)

    p_out = o_n[:, None] * dkstride_n + o_d[None, :]
    if ATOMIC:
        tl.atomic_add(DKEYS + p_out, b_dk * sm_scale, mask=m_kv)
        tl.atomic_add(DVALS + p_out, b_dv, mask=m_kv)
    else:
        tl.store(DKEYS + p_out, (b_dk * sm_scale).to(DKEYS.dtype.element_ty), mask=m_kv)
        tl.store(DVALS + p_out, b_dv.to(DVALS.dtype.element_ty), mask=m_kv)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PK, PV, DO, LSE, DELTA, DK, DV, DPK, DPV, MASK, BITS,
                     stride_b, stride_h, stride_n, pstride_b, pstride_h, pstride_n,
                     dostride_b, dostride_h, dostride_n, dstride_b, dstride_h, dstride_n,
                     dpstride_b, dpstride_h, dpstride_n,
                     H, N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                     MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys: axis-1 programs cover the token key blocks (into DK/DV), then the prompt key
    blocks (into DPK/DPV, fp32: per-(b, h) partials, or with ATOMIC atomics at batch stride 0)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_n = tl.program_id(1)
    n_token_blocks = tl.cdiv(N, BLOCK_N)
    qkv_base = i_b * stride_b + i_h * stride_h
    Q_BH = Q + qkv_base
    DO_BH = DO + i_b * dostride_b + i_h * dostride_h
    if i_n < n_token_blocks:
        grad_base = i_b * dstride_b + i_h * dstride_h
        _bwd_dkdv_block(Q_BH, DO_BH, LSE + i_bh * N, DELTA + i_bh * N, K + qkv_base, V + qkv_base, DK + grad_base,
                        DV + grad_base, MASK, BITS, i_b, i_n * BLOCK_N, N, stride_n, dostride_n, stride_n, dstride_n,
                        N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                        False, MASK_MODE, RENORMALIZE, False, BLOCK_M, BLOCK_N, D_PAD, PRECISION)
    else:
        prompt_base = i_b * pstride_b + i_h * pstride_h
        grad_base = i_b * dpstride_b + i_h * dpstride_h
        _bwd_dkdv_block(Q_BH, DO_BH, LSE + i_bh * N, DELTA + i_bh * N, PK + prompt_base, PV + prompt_base,
                        DPK + grad_base, DPV + grad_base, MASK, BITS, i_b, (i_n - n_token_blocks) * BLOCK_N, P,
                        stride_n, dostride_n, pstride_n, dpstride_n, N, P, D, qk_scale, sm_scale,
                        n_cls_prompts, pool_cls, len_cls, len_img,
                        True, MASK_MODE, RENORMALIZE, ATOMIC, BLOCK_M, BLOCK_N, D_PAD, PRECISION)


# ----------------------------------------------------------------------------------------------
# launchers: one kernel launch each. Tensors come in the layouts the kernels take (see the module docstring);
# the custom ops in _function.py allocate the gradient buffers and do the aten work around the launches.


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, by operand class and padded head dim (64 stands for
# 16..64). Chosen offline from the sm_90 compile report (`python benchmarks/tune.py --offline`,
# docs/sm90-resources.md): large tiles that ptxas fits in registers without spilling. fp32 runs exact (ieee)
# dots on CUDA cores, whose register cost forces small tiles. With token and prompt keys in one dK/dV launch and
# fp32 prompt K/V (what the model passes), the 16-bit D=64 dK/dV kernel spilled 12-14 at 4 warps (0 at 8) and the
# D=128 forward and dQ kernels 16 and 64 at 64x64 tiles (0 at 64x32), under triton 3.9. Not yet timed on a GPU:
# `benchmarks/tune.py` times the alternatives there.
LAUNCH_CONFIGS = {
    ("16-bit", 64): {"fwd": (64, 64, 4, 3), "bwd_dq": (64, 64, 4, 3), "bwd_dkdv": (64, 64, 8, 3)},
    ("16-bit", 128): {"fwd": (64, 32, 8, 3), "bwd_dq": (64, 32, 8, 3), "bwd_dkdv": (64, 32, 8, 3)},
    ("fp32", 64): {"fwd": (64, 32, 8, 2), "bwd_dq": (64, 32, 8, 2), "bwd_dkdv": (32, 32, 4, 1)},
    ("fp32", 128): {"fwd": (16, 64, 4, 2), "bwd_dq": (16, 64, 4, 2), "bwd_dkdv": (16, 32, 4, 1)},
}


def operand_class(dtype):
    return "fp32" if dtype == torch.float32 else "16-bit"


def config_key(D, dtype):
    """The LAUNCH_CONFIGS entry of head dim D and operand dtype."""
    return operand_class(dtype), max(64, triton.next_power_of_2(D))


def launch_config(kernel, N, D, dtype):
    """Constexprs and launch options of ``kernel`` ('fwd' | 'bwd_dq' | 'bwd_dkdv') for N tokens of head dim D.
    Blocks shrink to the sequence (at least 16, the smallest tl.dot)."""
    d_pad = max(16, triton.next_power_of_2(D))
    block_m, block_n, num_warps, num_stages = LAUNCH_CONFIGS[config_key(D, dtype)][kernel]
    rows = max(16, triton.next_power_of_2(N))
    return dict(BLOCK_M=min(block_m, rows), BLOCK_N=min(block_n, rows), D_PAD=d_pad,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)


def _bhn_strides(name, *tensors):
    """The (batch, head, row) strides that [B, H, N, D] tensors share ([H, N, D]: batch stride 0); D is unit-stride.
    Empty tensors (no program reads them) may have any strides."""
    strides = [(0, *t.stride()[:2]) if t.dim() == 3 else t.stride()[:3] for t in tensors]
    unit_d = all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in tensors)
    if tensors[0].numel() and (len(set(strides)) != 1 or not unit_d):
        raise ValueError(f"{name}: expected one (batch, head, row) stride set and unit stride on D, got strides "
                         f"{[t.stride() for t in tensors]}")
    return strides[0]


def _launch(kernel, grid, q, *args, **meta):
    """kernel[grid](q, *args, **meta), or nothing when the grid is empty (a zero-size dimension). Every attention
    kernel takes q first and runs its dots in q's dtype: bf16 is refused off CUDA (the interpreter)."""
    refuse_interpreter_bf16("q", q)
    if min(grid) > 0:
        kernel[grid](q, *args, **meta)


def attention_forward(q, k, v, prompt_k, prompt_v, selection, scale, renormalize):
    """One launch of ``_fwd_kernel``. q/k/v [B, H, N, D] share (b, h, n) strides, prompt_k/prompt_v ([H, P, D] or
    [B, H, P, D], q's dtype or fp32) share theirs. Returns (out [B, H, N, D] in q's dtype: a transposed view of a
    contiguous [B, N, H, D] buffer; lse [B, H, N] fp32 in log2 units)."""
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, N, D]
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    cfg = launch_config("fwd", N, D, q.dtype)
    sel_args = selection.kernel_args()
    _launch(_fwd_kernel, (B * H, triton.cdiv(N, cfg["BLOCK_M"])),
            q, k, v, prompt_k, prompt_v, *sel_args[:2], out, lse,
            *_bhn_strides("q/k/v", q, k, v), *_bhn_strides("prompt_k/prompt_v", prompt_k, prompt_v),
            *_bhn_strides("out", out), H, N, P, D, scale * LOG2E, *sel_args[2:],
            MASK_MODE=selection.mask_mode, RENORMALIZE=renormalize, **cfg)
    return out, lse


def attention_backward_dq(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize, dq):
    """One launch of ``_bwd_dq_kernel``: writes dq ([B, H, N, D], any (b, h, n) strides) and returns
    delta = rowsum(grad_out * out) ([B, H, N] fp32). grad_out and out are read through their own strides."""
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    cfg = launch_config("bwd_dq", N, D, q.dtype)
    sel_args = selection.kernel_args()
    _launch(_bwd_dq_kernel, (B * H, triton.cdiv(N, cfg["BLOCK_M"])),
            q, k, v, prompt_k, prompt_v, *sel_args[:2], out, grad_out, lse, delta, dq,
            *_bhn_strides("q/k/v", q, k, v), *_bhn_strides("prompt_k/prompt_v", prompt_k, prompt_v),
            *_bhn_strides("out", out), *_bhn_strides("grad_out", grad_out), *_bhn_strides("dq", dq),
            H, N, P, D, scale * LOG2E, scale, *sel_args[2:],
            MASK_MODE=selection.mask_mode, RENORMALIZE=renormalize, **cfg)
    return delta


def attention_backward_dkdv(grad_out, q, k, v, prompt_k, prompt_v, lse, delta, selection, scale, renormalize,
                            dk, dv, dprompt):
    """One launch of ``_bwd_dkdv_kernel``: writes dk, dv ([B, H, N, D] sharing (b, h, n) strides) and the prompt
    gradients into dprompt (fp32): [B, 2, H, P, D] (per-sample gradients, or per-(b, h) partials of prompts shared
    by the batch, which the caller sums), or [2, H, P, D] zero-filled, to which the kernel adds with atomics."""
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    cfg = launch_config("bwd_dkdv", N, D, q.dtype)
    sel_args = selection.kernel_args()
    dpk, dpv = dprompt.unbind(-4)  # [B, H, P, D] or [H, P, D]
    _launch(_bwd_dkdv_kernel, (B * H, triton.cdiv(N, cfg["BLOCK_N"]) + triton.cdiv(P, cfg["BLOCK_N"])),
            q, k, v, prompt_k, prompt_v, grad_out, lse, delta, dk, dv, dpk, dpv, *sel_args[:2],
            *_bhn_strides("q/k/v", q, k, v), *_bhn_strides("prompt_k/prompt_v", prompt_k, prompt_v),
            *_bhn_strides("grad_out", grad_out), *_bhn_strides("dk/dv", dk, dv), *_bhn_strides("dprompt", dpk, dpv),
            H, N, P, D, scale * LOG2E, scale, *sel_args[2:],
            MASK_MODE=selection.mask_mode, RENORMALIZE=renormalize, ATOMIC=dprompt.dim() == 4, **cfg)


def attention_backward(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize, deterministic,
                       needs_grad):
    """The whole Triton backward outside autograd, through the library's two backward ops (benchmarks/tune.py
    times it): grads of (q, k, v, prompt_k, prompt_v), None where needs_grad is False."""
    dq, dk, dv = token_grad_buffers(q)
    dprompt = attention_grads(dq, dk, dv, grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale,
                              renormalize, "triton", deterministic)
    return [g if need else None for g, need in zip((dq, dk, dv, *dprompt.unbind(-4)), needs_grad)]
