"""``match_select``: cosine matching, top-k selection and the matching loss in one pass over x (TCPA_SPEC.md §2).

Per token t of the block input ``x [B, N, C]`` and pool entry e (CLS-pool keys first, then image-pool keys):

    cos_te = x_t . k_e / (max(|x_t|, eps) * max(|k_e|, eps))           (norms in fp32 whatever x's dtype)
    bits_t = top-k of cos_t over the token's own pool (ties and NaN: see ``selection.select_topk``)
    term_t = w_t * sum_{e in bits_t} (1 - cos_te),   w_t = 1 / (B * tokens in t's group * k of t's group)

so ``terms.sum()`` is the layer's matching loss: mean(1 - s_topk) over prefix tokens + the same over patch tokens.

Backward (the selection is constant), with g_te = -w_t * dterm_t on selected entries and 0 elsewhere:

    dx_t    = (sum_e g_te khat_e - (sum_e g_te cos_te) xhat_t) / |x_t|   (|x_t| > eps; else sum_e g_te khat_e / eps)
    dk_e    = (dkhat_e - (dkhat_e . khat_e) khat_e) / |k_e|
    dkhat_e = sum_t g_te xhat_t,   dkhat_e . khat_e = sum_t g_te cos_te

The key gradient is a sum over every token: each backward program owns a slice of the token blocks and writes its
own fp32 partial ``[E, C]`` (deterministic); the sum over programs is a plain aten ``sum`` outside the op. Nothing
of size ``[B, N, E]`` is saved: the backward recomputes the cosines from x (which autograd holds for norm1 anyway).

In the model the same kernels also apply the block's frozen LayerNorm (``norm_match_select``): norm1 and matching
read the same rows of x, so one kernel does both forward, and one kernel writes one dx for both backward (the
norm's input gradient rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dh * w, added to the matching's): no
second pass over x and no extra accumulation into x's gradient.

Each custom op below launches exactly one kernel on the triton backend; the torch backend runs the same math in
PyTorch (CPU, float64) inside the same ops.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import check_pool_config, describe, validate_match_inputs
from tcpa_kernels.ops._function import refuse_double_backward
from tcpa_kernels.ops.selection import _topk_bits_torch, entry_selection, max_topk, own_pool, select_topk

EPS = 1e-12  # F.normalize's: norms below it are clamped
# Tokens per block, channels per step of the loop over C, warps, stages: chosen offline from the sm_90 compile
# report (fp32 x, 64 entries, with and without the fused LayerNorm: tiles ptxas fits without spilling;
# tests/compile_sm90.py checks them).
# Not timed on a GPU yet.
LAUNCH = {"fwd": dict(BLOCK_T=32, BLOCK_C=64, num_warps=8, num_stages=1),
          "bwd": dict(BLOCK_T=32, BLOCK_C=16, num_warps=8, num_stages=1)}
MAX_KEY_PARTIALS = 128  # backward programs, each writing one fp32 [E, C] partial of the key gradient


@triton.jit
def _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
             BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """cos [BLOCK_T, E_PAD] of rows o_t against every key, |x| [BLOCK_T] and |k| [E_PAD] (fp32, unclamped), and
    the row sums of x [BLOCK_T] (for the fused layer norm's mean)."""
    p_x = X + (o_t // N) * stride_b + (o_t % N) * stride_n  # [BLOCK_T] row pointers
    o_e = tl.arange(0, E_PAD)
    b_dot = tl.zeros([o_t.shape[0], E_PAD], dtype=tl.float32)
    b_xsq = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    b_ksq = tl.zeros([E_PAD], dtype=tl.float32)
    b_xsum = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        b_k = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img)  # [E_PAD, BLOCK_C]
        b_dot += tl.dot(b_x, tl.trans(b_k), input_precision="ieee")
        b_xsq += tl.sum(b_x * b_x, 1)
        b_ksq += tl.sum(b_k * b_k, 1)
        b_xsum += tl.sum(b_x, 1)
    b_xnorm, b_knorm = tl.sqrt(b_xsq), tl.sqrt(b_ksq)
    b_cos = b_dot / (tl.maximum(b_xnorm, 1e-12)[:, None] * tl.maximum(b_knorm, 1e-12)[None, :])
    return b_cos, b_xnorm, b_knorm, b_xsum


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
def _match_fwd_kernel(X, KEYS_CLS, KEYS_IMG, BITS, TERMS, NORM_W, NORM_B, H, MEAN, RSTD, n_rows, N, C,
                      stride_b, stride_n, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, k_max, w_cls, w_img,
                      eps, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """Selection words and loss terms of a block of tokens; with NORM also the block's layer norm h (the same rows
    of x, read again from cache rather than by a second kernel)."""
    o_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row = b*N + n
    m_t = o_t < n_rows
    b_cos, _, _, b_xsum = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
                                   BLOCK_C, E_PAD)
    is_prefix, m_valid, k_row = own_pool(o_t, N, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, E_PAD)
    b_bits, sel = select_topk(b_cos, m_valid, k_row, k_max)
    b_terms = tl.sum(tl.where(sel, 1.0 - b_cos, 0.0), 1) * tl.where(is_prefix, w_cls, w_img)  # [BLOCK_T]
    tl.store(BITS + o_t, b_bits, mask=m_t)
    tl.store(TERMS + o_t, b_terms, mask=m_t)
    if NORM:
        _layer_norm_rows(X, NORM_W, NORM_B, H, MEAN, RSTD, o_t, m_t, N, C, stride_b, stride_n, b_xsum / C, eps,
                         HAS_W, HAS_B, BLOCK_C)


@triton.jit
def _match_bwd_kernel(X, KEYS_CLS, KEYS_IMG, BITS, DTERMS, DX, DKEYS_PARTIAL, NORM_W, DH, MEAN, RSTD, n_rows, N, C,
                      stride_b, stride_n, dstride_b, dstride_n, num_prefix_tokens, pool_cls, pool_img, w_cls, w_img,
                      NEED_DX: tl.constexpr, NEED_DKEYS: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """Program i_p handles token blocks i_p, i_p + n_programs, ...; dx [B, N, C] contiguous, partial [E, C] fp32.
    With NORM, dx also gets the layer norm's input gradient from dh ([B*N, C] contiguous):
    rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dh * w, xhat = (x - mean) * rstd."""
    i_p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < pool_cls + pool_img
    p_partial = DKEYS_PARTIAL + i_p.to(tl.int64) * (pool_cls + pool_img) * C + o_e[:, None] * C
    for i_blk in range(i_p, tl.cdiv(n_rows, BLOCK_T), n_programs):
        o_t = i_blk * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T] row = b*N + n
        m_t = o_t < n_rows
        b_cos, b_xnorm, b_knorm, _ = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls,
                                              pool_img, BLOCK_C, E_PAD)
        is_prefix, _, _ = own_pool(o_t, N, num_prefix_tokens, pool_cls, pool_img, 0, 0, E_PAD)
        b_bits = tl.load(BITS + o_t, mask=m_t, other=0)  # [BLOCK_T] int64
        sel = ((b_bits[:, None] >> o_e[None, :].to(tl.int64)) & 1) != 0
        b_dterm = tl.load(DTERMS + (o_t // N) * dstride_b + (o_t % N) * dstride_n, mask=m_t, other=0.0)
        b_g = tl.where(sel & m_t[:, None], -(b_dterm * tl.where(is_prefix, w_cls, w_img))[:, None], 0.0)  # dL/dcos
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
            b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_C]
            b_khat = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img) * b_inv_k[:, None]
            if NEED_DX:
                b_dx = tl.dot(b_g, b_khat, input_precision="ieee") * b_inv_x[:, None] - b_xcoef[:, None] * b_x
                if NORM:
                    b_gn = _norm_upstream(NORM_W, DH, o_t, o_c, m_c, m_tc, C, HAS_W)  # [BLOCK_T, BLOCK_C]
                    b_xhat = (b_x - b_mean[:, None]) * b_rstd[:, None]
                    b_dx += b_rstd[:, None] * (b_gn - (b_gsum[:, None] + b_xhat * b_gxsum[:, None]) / C)
                tl.store(DX + o_t[:, None] * C + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_tc)
            if NEED_DKEYS:
                b_dkhat = tl.dot(tl.trans(b_g * b_inv_x[:, None]), b_x, input_precision="ieee")  # [E_PAD, BLOCK_C]
                b_dk = (b_dkhat - b_kdot[:, None] * b_khat) * b_inv_k[:, None]
                m_ec = m_e[:, None] & m_c[None, :]
                if i_blk != i_p:  # later blocks add to this program's partial
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


def _group_weights(B, N, num_prefix_tokens, k_cls, k_img):
    """(w_cls, w_img): the weight of one selected cosine of a prefix / patch token in the matching loss."""
    n_img = N - num_prefix_tokens
    return (1.0 / (B * num_prefix_tokens * k_cls) if num_prefix_tokens else 0.0,
            1.0 / (B * n_img * k_img) if n_img else 0.0)


def _rows(x):
    """x with unit stride on C, and its (batch, token) strides."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x, x.stride(0), x.stride(1)


def _forward_triton(x, keys_cls, keys_img, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens, k_cls,
                    k_img):
    B, N, C = x.shape
    x, stride_b, stride_n = _rows(x)
    bits = torch.empty((B, N), dtype=torch.int64, device=x.device)
    terms = torch.empty((B, N), dtype=torch.float32, device=x.device)
    h, mean, rstd = _norm_outputs(x, fuse_norm)
    pool_cls, pool_img = keys_cls.shape[0], keys_img.shape[0]
    if B * N:
        _match_fwd_kernel[(triton.cdiv(B * N, LAUNCH["fwd"]["BLOCK_T"]),)](
            x, keys_cls.contiguous(), keys_img.contiguous(), bits, terms, norm_weight, norm_bias, h, mean, rstd,
            B * N, N, C, stride_b, stride_n, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img,
            max_topk(N, num_prefix_tokens, k_cls, k_img), *_group_weights(B, N, num_prefix_tokens, k_cls, k_img),
            norm_eps, NORM=fuse_norm, HAS_W=norm_weight is not None, HAS_B=norm_bias is not None,
            E_PAD=_entries_padded(pool_cls + pool_img), **LAUNCH["fwd"])
    return terms, bits, h, mean, rstd


def _norm_outputs(x, fuse_norm):
    """Empty h [B, N, C] (x's dtype), mean and rstd [B, N] (fp32; fp64 for fp64 x) of the fused layer norm, or
    three empty placeholders."""
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    if not fuse_norm:
        return x.new_empty(0), x.new_empty(0, dtype=stats_dtype), x.new_empty(0, dtype=stats_dtype)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            *(torch.empty(x.shape[:2], dtype=stats_dtype, device=x.device) for _ in range(2)))


def _backward_programs(n_rows):
    return max(1, min(triton.cdiv(n_rows, LAUNCH["bwd"]["BLOCK_T"]), MAX_KEY_PARTIALS))


def _entries_padded(num_entries):
    return max(16, triton.next_power_of_2(num_entries))  # tl.dot needs >= 16


def _backward_triton(dterms, dh, x, keys_cls, keys_img, bits, norm_weight, mean, rstd, num_prefix_tokens, k_cls,
                     k_img, need_dx, need_dkeys):
    B, N, C = x.shape
    x, stride_b, stride_n = _rows(x)
    pool_cls, pool_img = keys_cls.shape[0], keys_img.shape[0]
    n_programs = _backward_programs(B * N)
    dx = torch.empty((B, N, C) if need_dx else (0,), dtype=x.dtype, device=x.device)
    partials = torch.empty((n_programs, pool_cls + pool_img, C) if need_dkeys else (0,), dtype=torch.float32,
                           device=x.device)
    if B * N:
        _match_bwd_kernel[(n_programs,)](
            x, keys_cls.contiguous(), keys_img.contiguous(), bits, dterms, dx, partials, norm_weight,
            None if dh is None else dh.contiguous(), mean, rstd, B * N, N, C, stride_b, stride_n, dterms.stride(0),
            dterms.stride(1), num_prefix_tokens, pool_cls, pool_img,
            *_group_weights(B, N, num_prefix_tokens, k_cls, k_img), NEED_DX=need_dx, NEED_DKEYS=need_dkeys,
            NORM=dh is not None, HAS_W=norm_weight is not None, E_PAD=_entries_padded(pool_cls + pool_img),
            **LAUNCH["bwd"])
    elif need_dkeys:
        partials.zero_()
    return dx, partials


def _cosines_torch(x, keys_cls, keys_img):
    """(cos [B, N, E], |x| [B, N, 1] unclamped, normalised keys [E, C]) in fp32 (fp64 for fp64 x)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    keys = torch.cat([keys_cls, keys_img]).to(dtype)
    keys_hat = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min(EPS)  # [E, C]
    x = x.to(dtype)
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, N, 1]
    return (x @ keys_hat.T) / x_norm.clamp_min(EPS), x_norm, keys_hat


def _token_weights(x, num_prefix_tokens, k_cls, k_img, dtype):
    """w_t of every token: [N, 1]."""
    w_cls, w_img = _group_weights(x.shape[0], x.shape[1], num_prefix_tokens, k_cls, k_img)
    w = torch.full((x.shape[1], 1), w_img, dtype=dtype, device=x.device)
    w[:num_prefix_tokens] = w_cls
    return w


def _forward_torch(x, keys_cls, keys_img, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens, k_cls,
                   k_img):
    cos, _, _ = _cosines_torch(x, keys_cls, keys_img)
    bits = _topk_bits_torch(cos, num_prefix_tokens, keys_cls.shape[0], k_cls, k_img)
    sel = entry_selection(bits, cos.shape[-1])
    terms = torch.where(sel, 1 - cos, 0).sum(-1) * _token_weights(x, num_prefix_tokens, k_cls, k_img, cos.dtype)[:, 0]
    h, mean, rstd = _norm_outputs(x, False)
    if fuse_norm:
        xc = x.to(cos.dtype)
        mean = xc.mean(-1)  # [B, N]
        rstd = (xc - mean[..., None]).square().mean(-1).add(norm_eps).rsqrt()
        h = (xc - mean[..., None]) * rstd[..., None]  # the statistics it saves, as the kernel does
        if norm_weight is not None:
            h = h * norm_weight.to(h.dtype)
        if norm_bias is not None:
            h = h + norm_bias.to(h.dtype)
        h = h.to(x.dtype)
    return terms, bits, h, mean, rstd


def _backward_torch(dterms, dh, x, keys_cls, keys_img, bits, norm_weight, mean, rstd, num_prefix_tokens, k_cls,
                    k_img, need_dx, need_dkeys):
    cos, x_norm, keys_hat = _cosines_torch(x, keys_cls, keys_img)
    xc = x.to(cos.dtype)
    w = _token_weights(x, num_prefix_tokens, k_cls, k_img, cos.dtype)
    g = torch.where(entry_selection(bits, cos.shape[-1]), -(dterms.to(cos.dtype) * w[:, 0])[..., None], 0)  # [B,N,E]
    inv_x = 1 / x_norm.clamp_min(EPS)  # [B, N, 1]
    dx, dkeys = x.new_empty(0), x.new_empty(0)  # two tensors: a custom op's outputs may not alias
    if need_dx:
        x_coef = torch.where(x_norm > EPS, (g * cos).sum(-1, keepdim=True) * inv_x * inv_x, 0)
        dx = (g @ keys_hat) * inv_x - x_coef * xc
        if dh is not None:  # the layer norm's input gradient
            gn = dh.to(cos.dtype) * (1 if norm_weight is None else norm_weight.to(cos.dtype))
            xhat = (xc - mean[..., None]) * rstd[..., None]
            dx = dx + rstd[..., None] * (gn - gn.mean(-1, keepdim=True) - xhat * (gn * xhat).mean(-1, keepdim=True))
        dx = dx.to(x.dtype)
    if need_dkeys:
        dkeys_hat = (g * inv_x).flatten(0, 1).T @ xc.flatten(0, 1)  # [E, C]
        k_norm = torch.linalg.vector_norm(torch.cat([keys_cls, keys_img]).to(cos.dtype), dim=-1, keepdim=True)
        dkeys = ((dkeys_hat - (g * cos).sum((0, 1))[:, None] * keys_hat) / k_norm.clamp_min(EPS))[None]
    return dx, dkeys


# ------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tcpa_kernels::match_fwd", mutates_args=())
def match_fwd(x: Tensor, keys_cls: Tensor, keys_img: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
              norm_eps: float, fuse_norm: bool, num_prefix_tokens: int, k_cls: int, k_img: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss terms [B, N], bits int64 [B, N], h, mean, rstd): one kernel (``_match_fwd_kernel``) on the triton
    backend. With ``fuse_norm`` the same kernel also applies the block's LayerNorm (frozen weight/bias or None, eps)
    to x: h [B, N, C] in x's dtype, mean and rstd [B, N]; else those three are empty."""
    implementation = _forward_triton if backend == "triton" else _forward_torch
    with torch.autocast(x.device.type, enabled=False):  # fp32 matching under autocast too
        return implementation(x, keys_cls, keys_img, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens,
                              k_cls, k_img)


@match_fwd.register_fake
def _(x, keys_cls, keys_img, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens, k_cls, k_img, backend):
    terms_dtype = torch.float64 if (backend == "torch" and x.dtype == torch.float64) else torch.float32
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    stats_shape = x.shape[:2] if fuse_norm else (0,)
    return (x.new_empty(x.shape[:2], dtype=terms_dtype), x.new_empty(x.shape[:2], dtype=torch.int64),
            x.new_empty(x.shape if fuse_norm else (0,)), x.new_empty(stats_shape, dtype=stats_dtype),
            x.new_empty(stats_shape, dtype=stats_dtype))


@torch.library.custom_op("tcpa_kernels::match_bwd", mutates_args=())
def match_bwd(dterms: Tensor, dh: Tensor | None, x: Tensor, keys_cls: Tensor, keys_img: Tensor, bits: Tensor,
              norm_weight: Tensor | None, mean: Tensor, rstd: Tensor, num_prefix_tokens: int, k_cls: int, k_img: int,
              backend: str, need_dx: bool, need_dkeys: bool) -> tuple[Tensor, Tensor]:
    """(dx [B, N, C] or empty, key-gradient partials [programs, E, C] or empty): one kernel (``_match_bwd_kernel``)
    on the triton backend. With dh (the gradient of the fused layer norm's h), dx includes the layer norm's."""
    implementation = _backward_triton if backend == "triton" else _backward_torch
    with torch.autocast(x.device.type, enabled=False):
        return implementation(dterms, dh, x, keys_cls, keys_img, bits, norm_weight, mean, rstd, num_prefix_tokens,
                              k_cls, k_img, need_dx, need_dkeys)


@match_bwd.register_fake
def _(dterms, dh, x, keys_cls, keys_img, bits, norm_weight, mean, rstd, num_prefix_tokens, k_cls, k_img, backend,
      need_dx, need_dkeys):
    B, N, C = x.shape
    n_programs = _backward_programs(B * N) if backend == "triton" else 1
    partial_dtype = torch.float32 if backend == "triton" else torch.promote_types(x.dtype, torch.float32)
    dx = x.new_empty((B, N, C) if need_dx else (0,))
    return dx, x.new_empty((n_programs, keys_cls.shape[0] + keys_img.shape[0], C) if need_dkeys else (0,),
                           dtype=partial_dtype)


def _setup_context(ctx, inputs, output):
    x, keys_cls, keys_img, norm_weight, norm_bias, _, fuse_norm, num_prefix_tokens, k_cls, k_img, backend = inputs
    if any(t is not None and t.requires_grad for t in (norm_weight, norm_bias)):
        raise ValueError("norm_weight/norm_bias: the fused layer norm takes frozen parameters (it computes no "
                         "gradient for them), got a tensor that requires grad; apply the norm outside the op")
    terms, bits, h, mean, rstd = output
    ctx.save_for_backward(x, keys_cls, keys_img, bits, norm_weight, mean, rstd)
    ctx.mark_non_differentiable(bits, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients are built for the words, the stats or an unused output
    ctx.config = (num_prefix_tokens, k_cls, k_img, backend)
    ctx.fuse_norm = fuse_norm


def _backward(ctx, dterms, dbits, dh, dmean, drstd):
    refuse_double_backward("match_select")
    x, keys_cls, keys_img, bits, norm_weight, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.fuse_norm else None  # without the norm, h is an empty placeholder
    need_dx, need_dkc, need_dki = ctx.needs_input_grad[:3]
    need_dkeys = (need_dkc or need_dki) and dterms is not None
    if dterms is None:  # the matching loss was not used: only the layer norm's gradient flows
        dterms = x.new_zeros(x.shape[:2], dtype=torch.promote_types(x.dtype, torch.float32))
    dx, partials = match_bwd(dterms, dh, x, keys_cls, keys_img, bits, norm_weight, mean, rstd, *ctx.config, need_dx,
                             need_dkeys)
    dkc = dki = None
    if need_dkeys:
        dkeys = partials.sum(0).to(keys_cls.dtype)  # [E, C]: the sum over programs (a no-op cast for fp32 keys)
        dkc, dki = dkeys[: keys_cls.shape[0]], dkeys[keys_cls.shape[0]:]
    return dx if need_dx else None, dkc, dki, *([None] * 8)


match_fwd.register_autograd(_backward, setup_context=_setup_context)


def norm_match_select(x: Tensor, norm: torch.nn.LayerNorm, keys_cls: Tensor, keys_img: Tensor, *, topk_cls: int,
                      topk_img: int, num_prefix_tokens: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(norm(x), bits, terms)`` in one kernel each way: the block's frozen LayerNorm fused with the matching of x
    (both read the same rows). For the model path: inputs come from the block, the backend is resolved. The output
    h is in x's dtype (under autocast an fp32 x gives the fp32 h that ``F.layer_norm`` would give; a 16-bit x gives
    h in 16 bits, which is what the next linear layer casts it to under autocast anyway)."""
    terms, bits, h, _, _ = match_fwd(x, keys_cls, keys_img, norm.weight, norm.bias, norm.eps, True, num_prefix_tokens,
                                     topk_cls, topk_img, backend)
    return h, bits, terms


def match_select(x: Tensor, keys_cls: Tensor, keys_img: Tensor, *, topk_cls: int, topk_img: int,
                 num_prefix_tokens: int = 1, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Cosine matching, top-k selection and matching-loss terms of every token, in one pass over x.

    Args:
        x: ``[B, N, C]`` block input (residual stream before norm1); prefix tokens first. Norms and cosines are
            computed in fp32 (fp64 for fp64 x on the torch backend), under autocast too.
        keys_cls: ``[Pc, C]`` keys of the CLS pool (used by the first ``num_prefix_tokens`` tokens).
        keys_img: ``[Pi, C]`` keys of the image pool (used by the patch tokens). Pc + Pi <= 64.
        topk_cls, topk_img: entries each prefix / patch token selects (1..pool size).
        num_prefix_tokens: CLS + register/distillation tokens at the start of the sequence.
        backend: "auto" | "triton" | "torch".

    Returns:
        ``(bits, terms)``: int64 ``[B, N]`` selection words (bit e = pool entry e, CLS entries first; ties go to
        the lower entry index, NaN scores rank lowest) and ``[B, N]`` fp32 loss terms whose sum is the matching
        loss, differentiable in x and the keys.

    Example::

        bits, terms = match_select(x, keys_cls, keys_img, topk_cls=10, topk_img=10)
        loss = task_loss + 0.01 * terms.sum()
    """
    validate_match_inputs(x, keys_cls, keys_img)
    check_pool_config("", keys_cls.shape[0], keys_img.shape[0], topk_cls, topk_img, 1, 1, num_prefix_tokens,
                      x.shape[1])
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"x: backend='triton' computes in fp32 and takes fp16/bf16/fp32, got {describe(x)}; "
                        "use backend='torch' for float64")
    terms, bits, _, _, _ = match_fwd(x, keys_cls, keys_img, None, None, 0.0, False, num_prefix_tokens, topk_cls,
                                     topk_img, backend)
    return bits, terms
