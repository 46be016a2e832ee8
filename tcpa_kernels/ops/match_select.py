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

Each custom op below launches exactly one kernel on the triton backend; the torch backend runs the same math in
PyTorch (CPU, float64) inside the same ops.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import check_pool_config, describe, validate_match_inputs
from tcpa_kernels.ops.selection import _topk_bits_torch, entry_selection, max_topk, own_pool, select_topk

EPS = 1e-12  # F.normalize's: norms below it are clamped
# Tokens per block, channels per step of the loop over C, warps, stages: chosen offline from the sm_90 compile
# report (fp32 x, 64 entries: the largest tiles ptxas fits without spilling; tests/compile_sm90.py checks them).
# Not timed on a GPU yet.
LAUNCH = {"fwd": dict(BLOCK_T=32, BLOCK_C=32, num_warps=8, num_stages=1),
          "bwd": dict(BLOCK_T=32, BLOCK_C=16, num_warps=8, num_stages=1)}
MAX_KEY_PARTIALS = 128  # backward programs, each writing one fp32 [E, C] partial of the key gradient


@triton.jit
def _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
             BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """cos [BLOCK_T, E_PAD] of rows o_t against every key, |x| [BLOCK_T] and |k| [E_PAD] (fp32, unclamped)."""
    p_x = X + (o_t // N) * stride_b + (o_t % N) * stride_n  # [BLOCK_T] row pointers
    o_e = tl.arange(0, E_PAD)
    b_dot = tl.zeros([o_t.shape[0], E_PAD], dtype=tl.float32)
    b_xsq = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    b_ksq = tl.zeros([E_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        b_k = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img)  # [E_PAD, BLOCK_C]
        b_dot += tl.dot(b_x, tl.trans(b_k), input_precision="ieee")
        b_xsq += tl.sum(b_x * b_x, 1)
        b_ksq += tl.sum(b_k * b_k, 1)
    b_xnorm, b_knorm = tl.sqrt(b_xsq), tl.sqrt(b_ksq)
    b_cos = b_dot / (tl.maximum(b_xnorm, 1e-12)[:, None] * tl.maximum(b_knorm, 1e-12)[None, :])
    return b_cos, b_xnorm, b_knorm


@triton.jit
def _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img):
    """Keys e = o_e (CLS pool, then image pool), channels o_c: fp32 [E_PAD, BLOCK_C], 0 past the pools."""
    m_cls = (o_e < pool_cls)[:, None] & m_c[None, :]
    m_img = ((o_e >= pool_cls) & (o_e < pool_cls + pool_img))[:, None] & m_c[None, :]
    b_cls = tl.load(KEYS_CLS + o_e[:, None] * C + o_c[None, :], mask=m_cls, other=0.0)
    b_img = tl.load(KEYS_IMG + (o_e - pool_cls)[:, None] * C + o_c[None, :], mask=m_img, other=0.0)
    return b_cls.to(tl.float32) + b_img.to(tl.float32)


@triton.jit
def _match_fwd_kernel(X, KEYS_CLS, KEYS_IMG, BITS, TERMS, n_rows, N, C, stride_b, stride_n,
                      num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, k_max, w_cls, w_img,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    o_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row = b*N + n
    m_t = o_t < n_rows
    b_cos, _, _ = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls, pool_img,
                           BLOCK_C, E_PAD)
    is_prefix, m_valid, k_row = own_pool(o_t, N, num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, E_PAD)
    b_bits, sel = select_topk(b_cos, m_valid, k_row, k_max)
    b_terms = tl.sum(tl.where(sel, 1.0 - b_cos, 0.0), 1) * tl.where(is_prefix, w_cls, w_img)  # [BLOCK_T]
    tl.store(BITS + o_t, b_bits, mask=m_t)
    tl.store(TERMS + o_t, b_terms, mask=m_t)


@triton.jit
def _match_bwd_kernel(X, KEYS_CLS, KEYS_IMG, BITS, DTERMS, DX, DKEYS_PARTIAL, n_rows, N, C, stride_b, stride_n,
                      dstride_b, dstride_n, num_prefix_tokens, pool_cls, pool_img, w_cls, w_img,
                      NEED_DX: tl.constexpr, NEED_DKEYS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """Program i_p handles token blocks i_p, i_p + n_programs, ...; dx [B, N, C] contiguous, partial [E, C] fp32."""
    i_p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < pool_cls + pool_img
    p_partial = DKEYS_PARTIAL + i_p.to(tl.int64) * (pool_cls + pool_img) * C + o_e[:, None] * C
    for i_blk in range(i_p, tl.cdiv(n_rows, BLOCK_T), n_programs):
        o_t = i_blk * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T] row = b*N + n
        m_t = o_t < n_rows
        b_cos, b_xnorm, b_knorm = _cosines(X, KEYS_CLS, KEYS_IMG, o_t, m_t, N, C, stride_b, stride_n, pool_cls,
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
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            m_tc = m_t[:, None] & m_c[None, :]
            b_x = tl.load(p_x[:, None] + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_C]
            b_khat = _load_keys(KEYS_CLS, KEYS_IMG, o_e, o_c, m_c, C, pool_cls, pool_img) * b_inv_k[:, None]
            if NEED_DX:
                b_dx = tl.dot(b_g, b_khat, input_precision="ieee") * b_inv_x[:, None] - b_xcoef[:, None] * b_x
                tl.store(DX + o_t[:, None] * C + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_tc)
            if NEED_DKEYS:
                b_dkhat = tl.dot(tl.trans(b_g * b_inv_x[:, None]), b_x, input_precision="ieee")  # [E_PAD, BLOCK_C]
                b_dk = (b_dkhat - b_kdot[:, None] * b_khat) * b_inv_k[:, None]
                m_ec = m_e[:, None] & m_c[None, :]
                if i_blk != i_p:  # later blocks add to this program's partial
                    b_dk += tl.load(p_partial + o_c[None, :], mask=m_ec, other=0.0)
                tl.store(p_partial + o_c[None, :], b_dk, mask=m_ec)


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


def _forward_triton(x, keys_cls, keys_img, num_prefix_tokens, k_cls, k_img):
    B, N, C = x.shape
    x, stride_b, stride_n = _rows(x)
    bits = torch.empty((B, N), dtype=torch.int64, device=x.device)
    terms = torch.empty((B, N), dtype=torch.float32, device=x.device)
    pool_cls, pool_img = keys_cls.shape[0], keys_img.shape[0]
    if B * N:
        _match_fwd_kernel[(triton.cdiv(B * N, LAUNCH["fwd"]["BLOCK_T"]),)](
            x, keys_cls.contiguous(), keys_img.contiguous(), bits, terms, B * N, N, C, stride_b, stride_n,
            num_prefix_tokens, pool_cls, pool_img, k_cls, k_img, max_topk(N, num_prefix_tokens, k_cls, k_img),
            *_group_weights(B, N, num_prefix_tokens, k_cls, k_img), E_PAD=_entries_padded(pool_cls + pool_img),
            **LAUNCH["fwd"])
    return terms, bits


def _backward_programs(n_rows):
    return max(1, min(triton.cdiv(n_rows, LAUNCH["bwd"]["BLOCK_T"]), MAX_KEY_PARTIALS))


def _entries_padded(num_entries):
    return max(16, triton.next_power_of_2(num_entries))  # tl.dot needs >= 16


def _backward_triton(dterms, x, keys_cls, keys_img, bits, num_prefix_tokens, k_cls, k_img, need_dx, need_dkeys):
    B, N, C = x.shape
    x, stride_b, stride_n = _rows(x)
    pool_cls, pool_img = keys_cls.shape[0], keys_img.shape[0]
    n_programs = _backward_programs(B * N)
    dx = torch.empty((B, N, C) if need_dx else (0,), dtype=x.dtype, device=x.device)
    partials = torch.empty((n_programs, pool_cls + pool_img, C) if need_dkeys else (0,), dtype=torch.float32,
                           device=x.device)
    if B * N:
        _match_bwd_kernel[(n_programs,)](
            x, keys_cls.contiguous(), keys_img.contiguous(), bits, dterms, dx, partials, B * N, N, C, stride_b,
            stride_n, dterms.stride(0), dterms.stride(1), num_prefix_tokens, pool_cls, pool_img,
            *_group_weights(B, N, num_prefix_tokens, k_cls, k_img), NEED_DX=need_dx, NEED_DKEYS=need_dkeys,
            E_PAD=_entries_padded(pool_cls + pool_img), **LAUNCH["bwd"])
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


def _forward_torch(x, keys_cls, keys_img, num_prefix_tokens, k_cls, k_img):
    cos, _, _ = _cosines_torch(x, keys_cls, keys_img)
    bits = _topk_bits_torch(cos, num_prefix_tokens, keys_cls.shape[0], k_cls, k_img)
    sel = entry_selection(bits, cos.shape[-1])
    terms = torch.where(sel, 1 - cos, 0).sum(-1) * _token_weights(x, num_prefix_tokens, k_cls, k_img, cos.dtype)[:, 0]
    return terms, bits


def _backward_torch(dterms, x, keys_cls, keys_img, bits, num_prefix_tokens, k_cls, k_img, need_dx, need_dkeys):
    cos, x_norm, keys_hat = _cosines_torch(x, keys_cls, keys_img)
    xc = x.to(cos.dtype)
    w = _token_weights(x, num_prefix_tokens, k_cls, k_img, cos.dtype)
    g = torch.where(entry_selection(bits, cos.shape[-1]), -(dterms.to(cos.dtype) * w[:, 0])[..., None], 0)  # [B,N,E]
    inv_x = 1 / x_norm.clamp_min(EPS)  # [B, N, 1]
    dx = dkeys = x.new_empty(0)
    if need_dx:
        x_coef = torch.where(x_norm > EPS, (g * cos).sum(-1, keepdim=True) * inv_x * inv_x, 0)
        dx = ((g @ keys_hat) * inv_x - x_coef * xc).to(x.dtype)
    if need_dkeys:
        dkeys_hat = (g * inv_x).flatten(0, 1).T @ xc.flatten(0, 1)  # [E, C]
        k_norm = torch.linalg.vector_norm(torch.cat([keys_cls, keys_img]).to(cos.dtype), dim=-1, keepdim=True)
        dkeys = ((dkeys_hat - (g * cos).sum((0, 1))[:, None] * keys_hat) / k_norm.clamp_min(EPS))[None]
    return dx, dkeys


# ------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tcpa_kernels::match_fwd", mutates_args=())
def match_fwd(x: Tensor, keys_cls: Tensor, keys_img: Tensor, num_prefix_tokens: int, k_cls: int, k_img: int,
              backend: str) -> tuple[Tensor, Tensor]:
    """(loss terms [B, N], bits int64 [B, N]): one kernel (``_match_fwd_kernel``) on the triton backend."""
    implementation = _forward_triton if backend == "triton" else _forward_torch
    with torch.autocast(x.device.type, enabled=False):  # fp32 matching under autocast too
        return implementation(x, keys_cls, keys_img, num_prefix_tokens, k_cls, k_img)


@match_fwd.register_fake
def _(x, keys_cls, keys_img, num_prefix_tokens, k_cls, k_img, backend):
    terms_dtype = torch.float64 if (backend == "torch" and x.dtype == torch.float64) else torch.float32
    return x.new_empty(x.shape[:2], dtype=terms_dtype), x.new_empty(x.shape[:2], dtype=torch.int64)


@torch.library.custom_op("tcpa_kernels::match_bwd", mutates_args=())
def match_bwd(dterms: Tensor, x: Tensor, keys_cls: Tensor, keys_img: Tensor, bits: Tensor, num_prefix_tokens: int,
              k_cls: int, k_img: int, backend: str, need_dx: bool, need_dkeys: bool) -> tuple[Tensor, Tensor]:
    """(dx [B, N, C] or empty, key-gradient partials [programs, E, C] or empty): one kernel (``_match_bwd_kernel``)
    on the triton backend."""
    implementation = _backward_triton if backend == "triton" else _backward_torch
    with torch.autocast(x.device.type, enabled=False):
        return implementation(dterms, x, keys_cls, keys_img, bits, num_prefix_tokens, k_cls, k_img, need_dx, need_dkeys)


@match_bwd.register_fake
def _(dterms, x, keys_cls, keys_img, bits, num_prefix_tokens, k_cls, k_img, backend, need_dx, need_dkeys):
    B, N, C = x.shape
    n_programs = _backward_programs(B * N) if backend == "triton" else 1
    partial_dtype = torch.float32 if backend == "triton" else torch.promote_types(x.dtype, torch.float32)
    dx = x.new_empty((B, N, C) if need_dx else (0,))
    return dx, x.new_empty((n_programs, keys_cls.shape[0] + keys_img.shape[0], C) if need_dkeys else (0,),
                           dtype=partial_dtype)


def _setup_context(ctx, inputs, output):
    x, keys_cls, keys_img, num_prefix_tokens, k_cls, k_img, backend = inputs
    ctx.save_for_backward(x, keys_cls, keys_img, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient is built for the selection words
    ctx.config = (num_prefix_tokens, k_cls, k_img, backend)


def _backward(ctx, dterms, dbits):
    x, keys_cls, keys_img, bits = ctx.saved_tensors
    need_dx, need_dkc, need_dki = ctx.needs_input_grad[:3]
    dx, partials = match_bwd(dterms, x, keys_cls, keys_img, bits, *ctx.config, need_dx, need_dkc or need_dki)
    dkc = dki = None
    if need_dkc or need_dki:
        dkeys = partials.sum(0).to(keys_cls.dtype)  # [E, C]: the sum over programs (a no-op cast for fp32 keys)
        dkc, dki = dkeys[: keys_cls.shape[0]], dkeys[keys_cls.shape[0]:]
    return dx if need_dx else None, dkc, dki, None, None, None, None


match_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    terms, bits = match_fwd(x, keys_cls, keys_img, num_prefix_tokens, topk_cls, topk_img, backend)
    return bits, terms
