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
- ``_bwd_dq_kernel``  per query block: computes and stores delta, then dq.
- ``_bwd_dkdv_kernel`` per key block, launched once for token keys and once for prompt keys.
  Prompt K/V shared by the batch ([H, P, D]) need a reduction over the batch: either per-(b, h)
  fp32 partials summed afterwards (deterministic) or fp32 atomics into [H, P, D].

Layouts: q/k/v [B, H, N, D] with any b/h/n strides (unit stride on D), prompts [H|B, H, P, D]
contiguous, o/do/dq/dk/dv contiguous [B, H, N, D], lse/delta [B*H, N] fp32.
Offsets of the (batch, head) base are int64; the grid puts batch*head on axis 0 (up to 2^31-1).
"""

import torch
import triton
import triton.language as tl

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
def _query_block(H, N, D, stride_b, stride_h, pstride_b, pstride_h, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """This program's (batch*head, query block): ids, int64 base offsets of q/k/v and prompts, row/dim offsets."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_d = tl.arange(0, D_PAD)
    m_md = m_m[:, None] & (o_d < D)[None, :]
    return i_bh, i_b, i_b * stride_b + i_h * stride_h, i_b * pstride_b + i_h * pstride_h, o_m, m_m, o_d, m_md


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
    b_k = tl.load(K_BASE + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, D_PAD]
    b_v = tl.load(V_BASE + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)
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
                stride_b, stride_h, stride_n, pstride_b, pstride_h,
                H, N, P, D, qk_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    i_bh, i_b, qkv_base, prompt_base, o_m, m_m, o_d, m_md = _query_block(
        H, N, D, stride_b, stride_h, pstride_b, pstride_h, BLOCK_M, D_PAD)
    b_q = tl.load(Q + qkv_base + o_m[:, None] * stride_n + o_d[None, :], mask=m_md, other=0.0)  # [BM, D_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, b_q, K + qkv_base, V + qkv_base, stride_n, N, qk_scale,
                                   MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                                   len_img, D, False, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    acc, m_i, l_i = _fwd_key_range(acc, m_i, l_i, b_q, PK + prompt_base, PV + prompt_base, D, P, qk_scale,
                                   MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                                   len_img, D, True, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    b_o = acc / l_i[:, None]
    tl.store(O + i_bh * N * D + o_m[:, None] * D + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_md)
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
                   stride_b, stride_h, stride_n, pstride_b, pstride_h,
                   H, N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                   MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    i_bh, i_b, qkv_base, prompt_base, o_m, m_m, o_d, m_md = _query_block(
        H, N, D, stride_b, stride_h, pstride_b, pstride_h, BLOCK_M, D_PAD)
    p_rows = i_bh * N * D + o_m[:, None] * D + o_d[None, :]  # contiguous [B, H, N, D] tensors
    b_q = tl.load(Q + qkv_base + o_m[:, None] * stride_n + o_d[None, :], mask=m_md, other=0.0)  # [BM, D_PAD]
    b_do = tl.load(DO + p_rows, mask=m_md, other=0.0)
    b_o = tl.load(O + p_rows, mask=m_md, other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)  # [BM]
    tl.store(DELTA + i_bh * N + o_m, b_delta, mask=m_m)
    b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.0)

    b_dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    b_dq = _bwd_dq_key_range(b_dq, b_q, b_do, b_lse, b_delta, K + qkv_base, V + qkv_base, stride_n, N,
                             qk_scale, MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                             len_img, D, False, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    b_dq = _bwd_dq_key_range(b_dq, b_q, b_do, b_lse, b_delta, PK + prompt_base, PV + prompt_base, D, P,
                             qk_scale, MASK, BITS, i_b, o_m, m_m, N, P, n_cls_prompts, pool_cls, len_cls,
                             len_img, D, True, MASK_MODE, RENORMALIZE, BLOCK_N, D_PAD, PRECISION)
    tl.store(DQ + p_rows, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_md)


@triton.jit
def _bwd_dkdv_kernel(Q, DO, LSE, DELTA, KEYS, VALS, DKEYS, DVALS, MASK, BITS,
                     stride_b, stride_h, stride_n, kstride_b, kstride_h, kstride_n,
                     dstride_b, dstride_h, dstride_n,
                     H, N, P, D, n_keys, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                     IS_PROMPT: tl.constexpr, MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr,
                     ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys (token keys, or prompt keys when IS_PROMPT)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    qkv_base = i_b * stride_b + i_h * stride_h
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_keys
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    m_kv = m_n[:, None] & m_d[None, :]
    p_kv = i_b * kstride_b + i_h * kstride_h + o_n[:, None] * kstride_n + o_d[None, :]
    b_k = tl.load(KEYS + p_kv, mask=m_kv, other=0.0)  # [BN, D_PAD]
    b_v = tl.load(VALS + p_kv, mask=m_kv, other=0.0)

    b_dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(Q + qkv_base + o_m[:, None] * stride_n + o_d[None, :], mask=m_md, other=0.0)
        b_do = tl.load(DO + i_bh * N * D + o_m[:, None] * D + o_d[None, :], mask=m_md, other=0.0)
        b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(DELTA + i_bh * N + o_m, mask=m_m, other=0.0)
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

    p_out = i_b * dstride_b + i_h * dstride_h + o_n[:, None] * dstride_n + o_d[None, :]
    if ATOMIC:
        tl.atomic_add(DKEYS + p_out, b_dk * sm_scale, mask=m_kv)
        tl.atomic_add(DVALS + p_out, b_dv, mask=m_kv)
    else:
        tl.store(DKEYS + p_out, (b_dk * sm_scale).to(DKEYS.dtype.element_ty), mask=m_kv)
        tl.store(DVALS + p_out, b_dv.to(DVALS.dtype.element_ty), mask=m_kv)


# ----------------------------------------------------------------------------------------------
# launchers


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, by operand class and padded head dim (64 stands for
# 16..64). Chosen offline from the sm_90 compile report (`python benchmarks/tune.py --offline`,
# docs/sm90-resources.md): large tiles that ptxas fits in registers without spilling. fp32 runs exact (ieee)
# dots on CUDA cores, whose register cost forces small tiles. Not yet timed on a GPU: `benchmarks/tune.py`
# times the alternatives there (issue #5).
LAUNCH_CONFIGS = {
    ("16-bit", 64): {"fwd": (64, 64, 4, 3), "bwd_dq": (64, 64, 4, 3), "bwd_dkdv": (64, 64, 4, 3)},
    ("16-bit", 128): {"fwd": (64, 64, 8, 3), "bwd_dq": (64, 64, 8, 3), "bwd_dkdv": (64, 32, 8, 3)},
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


def _strided_qkv(q, k, v):
    """q/k/v sharing one (b, h, n) stride set with unit stride on D, as the kernels read them.

    timm's fused qkv gives exactly that (views of one [B, N, 3, H, D] tensor), so no copy is made there;
    other layouts are copied to contiguous once.
    """
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _prompt_strides(prompt_k):
    """(batch stride, head stride) of contiguous prompts; batch stride 0 when shared [H, P, D]."""
    P, D = prompt_k.shape[-2:]
    return (0 if prompt_k.dim() == 3 else prompt_k.shape[-3] * P * D), P * D


def attention_forward(q, k, v, prompt_k, prompt_v, selection, scale, renormalize):
    """Triton forward. Returns (out [B, H, N, D], lse [B, H, N] fp32 in log2 units)."""
    q, k, v = _strided_qkv(q, k, v)
    prompt_k, prompt_v = prompt_k.contiguous(), prompt_v.contiguous()
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = launch_config("fwd", N, D, q.dtype)
    sel_args = selection.kernel_args()
    grid = (B * H, triton.cdiv(N, cfg["BLOCK_M"]))
    _fwd_kernel[grid](
        q, k, v, prompt_k, prompt_v, *sel_args[:2], out, lse,
        q.stride(0), q.stride(1), q.stride(2), *_prompt_strides(prompt_k),
        H, N, P, D, scale * LOG2E, *sel_args[2:],
        MASK_MODE=selection.mask_mode, RENORMALIZE=renormalize, **cfg,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize,
                       deterministic, needs_grad):
    """Triton backward. needs_grad = (q, k, v, prompt_k, prompt_v) flags; returns their grads or None."""
    q, k, v = _strided_qkv(q, k, v)
    prompt_k, prompt_v = prompt_k.contiguous(), prompt_v.contiguous()
    grad_out = grad_out.contiguous()
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    sel_args = selection.kernel_args()
    sel_ptrs, sel_ints = sel_args[:2], sel_args[2:]
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2))
    pstrides = _prompt_strides(prompt_k)
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    flags = dict(MASK_MODE=selection.mask_mode, RENORMALIZE=renormalize)
    grads = [None] * 5
    if dq.numel() == 0:
        return [torch.zeros_like(t) if need else None for t, need in zip((q, k, v, prompt_k, prompt_v), needs_grad)]

    cfg = launch_config("bwd_dq", N, D, q.dtype)
    _bwd_dq_kernel[(B * H, triton.cdiv(N, cfg["BLOCK_M"]))](
        q, k, v, prompt_k, prompt_v, *sel_ptrs, out, grad_out, lse, delta, dq,
        *qkv_strides, *pstrides, H, N, P, D, scale * LOG2E, scale, *sel_ints, **flags, **cfg,
    )
    if needs_grad[0]:
        grads[0] = dq

    cfg = launch_config("bwd_dkdv", N, D, q.dtype)

    def dkdv(keys, vals, dkeys, dvals, dstrides, n_keys, is_prompt, atomic):
        kstrides = qkv_strides if not is_prompt else (*pstrides, D)
        _bwd_dkdv_kernel[(B * H, triton.cdiv(n_keys, cfg["BLOCK_N"]))](
            q, grad_out, lse, delta, keys, vals, dkeys, dvals, *sel_ptrs,
            *qkv_strides, *kstrides, *dstrides, H, N, P, D, n_keys, scale * LOG2E, scale, *sel_ints,
            IS_PROMPT=is_prompt, ATOMIC=atomic, **flags, **cfg,
        )

    if needs_grad[1] or needs_grad[2]:
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        dkdv(k, v, dk, dv, (H * N * D, N * D, D), N, False, False)
        grads[1], grads[2] = dk, dv
    if needs_grad[3] or needs_grad[4]:
        shared = prompt_k.dim() == 3
        atomic = shared and not (deterministic or torch.are_deterministic_algorithms_enabled())
        if atomic:  # fp32 atomics straight into [H, P, D]
            dpk = torch.zeros((H, P, D), dtype=torch.float32, device=q.device)
            dstrides = (0, P * D, D)
        else:  # [B, H, P, D]: per-sample gradients, or per-(b, h) partials summed below
            dpk = torch.empty((B, H, P, D), dtype=torch.float32, device=q.device)
            dstrides = (H * P * D, P * D, D)
        dpv = torch.zeros_like(dpk) if atomic else torch.empty_like(dpk)
        dkdv(prompt_k, prompt_v, dpk, dpv, dstrides, P, True, atomic)
        if shared and not atomic:
            dpk, dpv = dpk.sum(0), dpv.sum(0)
        grads[3], grads[4] = dpk.to(prompt_k.dtype), dpv.to(prompt_v.dtype)
    return [g if need else None for g, need in zip(grads, needs_grad)]
