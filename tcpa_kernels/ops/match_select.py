"""``match_select``: cosine matching, top-k selection and the matching loss in one pass over x (docs/how-it-works.md,
'Matching and selection').

Per token t of the block input ``x [B, N, C]`` and pool entry e (CLS-pool keys first, then image-pool keys):

    cos_te = x_t . k_e / (max(|x_t|, eps) * max(|k_e|, eps))           (norms in fp32 whatever x's dtype)
    bits_t = top-k of cos_t over the token's own pool (ties and NaN: see ``_selection_kernels.select_topk``)
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

Each kernel op below (``_function.KernelOp``: a custom op under torch.compile, a direct call in eager mode)
launches exactly one kernel on the triton backend (``_match_kernels.py``, imported on first use); the torch backend
runs the same math in PyTorch (CPU, float64) inside the same ops. ``MatchSelect`` is their autograd Function (in
eager mode it calls the ops' launchers itself); ``match_select`` checks its arguments and calls ``match``, the
entry of the model path (``norm_match`` with the LayerNorm fused).
"""

import functools

import torch
from torch import Tensor

from tcpa_kernels._backend import autocast_off, kernels, resolve_backend, sm_count
from tcpa_kernels._validate import check_pool_config, describe, validate_match_inputs
from tcpa_kernels.ops._function import kernel_op, refuse_double_backward, traced
from tcpa_kernels.ops.selection import _topk_bits_torch, check_layouts, check_tasks, entry_selection, sum_per_task

EPS = 1e-12  # F.normalize's: norms below it are clamped

# ------------------------------------------------------------------------------------------- shared with the kernels


def group_weights(B, N, num_prefix_tokens, k_cls, k_img):
    """(w_cls, w_img): the weight of one selected cosine of a prefix / patch token in the matching loss (0 for a
    group without tokens, an empty batch included)."""
    n_img = N - num_prefix_tokens
    return (1.0 / (B * num_prefix_tokens * k_cls) if B and num_prefix_tokens else 0.0,
            1.0 / (B * n_img * k_img) if B and n_img else 0.0)


def _cosines_torch(x, keys_cls, keys_img, tasks):
    """(cos [B, N, E], |x| [B, N, 1] unclamped, the keys normalised and their norms clamped ([E, C] and [E, 1]; with
    tasks each sample's set of the bank, gathered as the reference backend may, [B, E, C] and [B, E, 1])) in fp32
    (fp64 for fp64 x)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    keys = torch.cat([keys_cls, keys_img], dim=-2).to(dtype)  # CLS pool first
    keys = keys if tasks is None else keys[tasks.long()]
    keys_norm = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min(EPS)
    keys_hat = keys / keys_norm
    x = x.to(dtype)
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, N, 1]
    return (x @ keys_hat.transpose(-1, -2)) / x_norm.clamp_min(EPS), x_norm, keys_hat, keys_norm


def _token_weights(x, num_prefix_tokens, k_cls, k_img, layouts, dtype):
    """w_t of every token: [N] (with layouts, each sample's own k: [B, N])."""
    if layouts is not None:
        w_cls, w_img = group_weights(x.shape[0], x.shape[1], num_prefix_tokens, 1, 1)
        k = layouts[:, 2:4].to(dtype)  # [B, 2]: each sample's k_cls, k_img
        return torch.cat([(w_cls / k[:, :1]).expand(-1, num_prefix_tokens),
                          (w_img / k[:, 1:]).expand(-1, x.shape[1] - num_prefix_tokens)], dim=1)
    w_cls, w_img = group_weights(x.shape[0], x.shape[1], num_prefix_tokens, k_cls, k_img)
    w = torch.full((x.shape[1],), w_img, dtype=dtype, device=x.device)
    w[:num_prefix_tokens] = w_cls
    return w


def _forward_torch(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm,
                   num_prefix_tokens, k_cls, k_img):
    cos = _cosines_torch(x, keys_cls, keys_img, tasks)[0]
    bits = _topk_bits_torch(cos, num_prefix_tokens, keys_cls.shape[-2], k_cls, k_img, layouts)
    sel = entry_selection(bits, cos.shape[-1])
    terms = torch.where(sel, 1 - cos, 0).sum(-1) * _token_weights(x, num_prefix_tokens, k_cls, k_img, layouts,
                                                                  cos.dtype)
    h = mean = rstd = None
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


def _backward_torch(dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd,
                    num_prefix_tokens, k_cls, k_img, need_dx, need_dkeys):
    cos, x_norm, keys_hat, k_norm = _cosines_torch(x, keys_cls, keys_img, tasks)
    xc = x.to(cos.dtype)
    w = _token_weights(x, num_prefix_tokens, k_cls, k_img, layouts, cos.dtype)
    g = torch.where(entry_selection(bits, cos.shape[-1]), -(dterms.to(cos.dtype) * w)[..., None], 0)  # [B, N, E]
    inv_x = 1 / x_norm.clamp_min(EPS)  # [B, N, 1]
    dx = dkeys = None
    if need_dx:
        x_coef = torch.where(x_norm > EPS, (g * cos).sum(-1, keepdim=True) * inv_x * inv_x, 0)
        dx = (g @ keys_hat) * inv_x - x_coef * xc
        if dh is not None:  # the layer norm's input gradient
            gn = dh.to(cos.dtype) * (1 if norm_weight is None else norm_weight.to(cos.dtype))
            xhat = (xc - mean[..., None]) * rstd[..., None]
            dx = dx + rstd[..., None] * (gn - gn.mean(-1, keepdim=True) - xhat * (gn * xhat).mean(-1, keepdim=True))
        if dres is not None:  # the residual stream's gradient
            dx = dx + dres.to(cos.dtype)
        dx = dx.to(x.dtype)
    if need_dkeys:  # one partial [1, E, C]; with tasks one per sample [B, E, C], summed per set by the caller
        if tasks is None:
            dkeys_hat = (g * inv_x).flatten(0, 1).T @ xc.flatten(0, 1)  # [E, C]
            dkeys = ((dkeys_hat - (g * cos).sum((0, 1))[:, None] * keys_hat) / k_norm)[None]
        else:
            dkeys_hat = (g * inv_x).transpose(1, 2) @ xc  # [B, E, C]
            dkeys = (dkeys_hat - (g * cos).sum(1)[..., None] * keys_hat) / k_norm
    return dx, dkeys


# ------------------------------------------------------------------------------------------- custom ops


def _stats_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _partials_dtype(x, backend):
    return torch.float32 if backend == "triton" else _stats_dtype(x)


class _TorchMatching:
    """The torch backend's launchers: the PyTorch twin of ``_match_kernels.forward`` / ``backward``, autocast off."""

    @staticmethod
    def forward(x, *args):
        with autocast_off(x.device.type):  # fp32 matching under autocast too
            return _forward_torch(x, *args)

    @staticmethod
    def backward(dterms, dh, dres, x, *args):
        with autocast_off(x.device.type):  # fp32 matching under autocast too
            return _backward_torch(dterms, dh, dres, x, *args)


@functools.cache
def _implementation(backend):
    """The matching launchers of ``backend`` (the Triton kernels' module, imported on first use, or their twin): each
    takes what its op below takes but the backend, and returns None where the op returns an empty placeholder."""
    return kernels("_match_kernels") if backend == "triton" else _TorchMatching


@kernel_op("tcpa_kernels::match_fwd")
def match_fwd(x: Tensor, keys_cls: Tensor, keys_img: Tensor, tasks: Tensor | None, layouts: Tensor | None,
              norm_weight: Tensor | None, norm_bias: Tensor | None, norm_eps: float, fuse_norm: bool,
              num_prefix_tokens: int, k_cls: int, k_img: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                      Tensor]:
    """(loss terms [B, N], bits int64 [B, N], h, mean, rstd): one kernel (``_match_fwd_kernel``) on the triton
    backend. Keys [pool, C] each, or with tasks (int [B]) a bank's [T, pool, C], sample b matching set tasks[b];
    with layouts (int [B, 6], ``Selection.layouts``) each sample's own pools and k inside the padded ones (k_cls,
    k_img: the largest). With ``fuse_norm`` the same kernel also applies the block's LayerNorm (frozen weight/bias
    or None, eps) to x: h [B, N, C] in x's dtype, mean and rstd [B, N]; else those three are empty."""
    terms, bits, h, mean, rstd = _implementation(backend).forward(x, keys_cls, keys_img, tasks, layouts, norm_weight,
                                                                  norm_bias, norm_eps, fuse_norm, num_prefix_tokens,
                                                                  k_cls, k_img)
    if not fuse_norm:
        h, mean, rstd = x.new_empty(0), x.new_empty(0, dtype=_stats_dtype(x)), x.new_empty(0, dtype=_stats_dtype(x))
    return terms, bits, h, mean, rstd


@match_fwd.register_fake
def _(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens, k_cls,
      k_img, backend):
    terms_dtype = torch.float64 if (backend == "torch" and x.dtype == torch.float64) else torch.float32
    stats_shape = x.shape[:2] if fuse_norm else (0,)
    return (x.new_empty(x.shape[:2], dtype=terms_dtype), x.new_empty(x.shape[:2], dtype=torch.int64),
            x.new_empty(x.shape if fuse_norm else (0,)), x.new_empty(stats_shape, dtype=_stats_dtype(x)),
            x.new_empty(stats_shape, dtype=_stats_dtype(x)))


@kernel_op("tcpa_kernels::match_bwd")
def match_bwd(dterms: Tensor, dh: Tensor | None, dres: Tensor | None, x: Tensor, keys_cls: Tensor, keys_img: Tensor,
              tasks: Tensor | None, layouts: Tensor | None, bits: Tensor, norm_weight: Tensor | None, mean: Tensor,
              rstd: Tensor, num_prefix_tokens: int, k_cls: int, k_img: int, need_dx: bool, need_dkeys: bool,
              backend: str) -> tuple[Tensor, Tensor]:
    """(dx [B, N, C] or empty, key-gradient partials [programs, E, C] or empty; with tasks one per sample,
    [B, E, C]): one kernel (``_match_bwd_kernel``) on the triton backend. With dh (the gradient of the fused layer
    norm's h), dx includes the layer norm's; with dres ([B, N, C]: a residual gradient, what a block's input gets
    around its attention) dx includes it too."""
    dx, partials = _implementation(backend).backward(dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits,
                                                     norm_weight, mean, rstd, num_prefix_tokens, k_cls, k_img,
                                                     need_dx, need_dkeys)
    return (x.new_empty(0) if dx is None else dx,
            x.new_empty(0, dtype=_partials_dtype(x, backend)) if partials is None else partials)


@match_bwd.register_fake
def _(dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd, num_prefix_tokens, k_cls,
      k_img, need_dx, need_dkeys, backend):
    B, N, C = x.shape
    if tasks is not None:
        n_programs = B
    elif backend == "triton":
        n_programs = kernels("_match_kernels").backward_programs(B * N, sm_count(x.device))
    else:
        n_programs = 1
    dx = x.new_empty((B, N, C) if need_dx else (0,))
    return dx, x.new_empty((n_programs, keys_cls.shape[-2] + keys_img.shape[-2], C) if need_dkeys else (0,),
                           dtype=_partials_dtype(x, backend))


_NO_GRADS = (None,) * 10  # MatchSelect's gradients of the tasks, layouts, the norm's parameters, pool layout, flags


class MatchSelect(torch.autograd.Function):
    """``apply(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens,
    k_cls, k_img, backend)`` -> (terms [B, N], bits [B, N] (not differentiable)), and with ``fuse_norm`` h [B, N, C]:
    the matching kernels forward and backward (their launchers in eager mode, ``match_fwd`` / ``match_bwd``
    traced); the layer norm's weight and bias must be frozen (no gradient is computed for them). With tasks the keys
    are a bank's [T, pool, C], each set's gradient the sum of its samples'; with layouts each sample's own pools."""

    @staticmethod
    def forward(ctx, x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm,
                num_prefix_tokens, k_cls, k_img, backend):
        terms, bits, h, mean, rstd = matching_forward(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias,
                                                      norm_eps, fuse_norm, num_prefix_tokens, k_cls, k_img, backend)
        ctx.save_for_backward(x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd)  # bits: no grad
        ctx.set_materialize_grads(False)  # no zero gradients are built for the words or an unused output
        ctx.config = (num_prefix_tokens, k_cls, k_img, backend)
        return (terms, bits, h) if fuse_norm else (terms, bits)

    @staticmethod
    def backward(ctx, dterms, dbits, dh=None):
        """dh None: no norm fused, or its output unused (then only the matching's gradient flows)."""
        refuse_double_backward("match_select")
        x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd = ctx.saved_tensors
        dx, dkc, dki = matching_grads(dterms, dh, None, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean,
                                      rstd, *ctx.config, ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:3]))
        return dx, dkc, dki, *_NO_GRADS


def matching_forward(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm,
                     num_prefix_tokens, k_cls, k_img, backend):
    """``match_fwd`` (traced) or its launcher (eager): (terms, bits, h, mean, rstd), the last three None or empty
    without ``fuse_norm``."""
    args = (x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, fuse_norm, num_prefix_tokens,
            k_cls, k_img)
    return match_fwd(*args, backend) if traced() else _implementation(backend).forward(*args)


def matching_grads(dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd,
                   num_prefix_tokens, k_cls, k_img, backend, need_dx, need_dkeys):
    """The matching backward, with the fused layer norm's when dh is given and a residual gradient (dres, added to
    dx) when given: (dx, dkeys_cls, dkeys_img), None where not needed. dterms None: the matching loss was not used,
    only the layer norm's (and the residual's) gradient flows."""
    need_dkeys = need_dkeys and dterms is not None
    if dterms is None:
        dterms = x.new_zeros(x.shape[:2], dtype=_stats_dtype(x))
    args = (dterms, dh, dres, x, keys_cls, keys_img, tasks, layouts, bits, norm_weight, mean, rstd, num_prefix_tokens,
            k_cls, k_img, need_dx, need_dkeys)
    dx, partials = match_bwd(*args, backend) if traced() else _implementation(backend).backward(*args)
    if not need_dkeys:
        return dx if need_dx else None, None, None
    pool_cls = keys_cls.shape[-2]
    if tasks is not None:  # each pool's [T, pool, C] by itself (contiguous, as its parameter): summed per set
        dkeys = [sum_per_task(part, tasks, keys_cls.shape[0]) for part in (partials[:, :pool_cls],
                                                                          partials[:, pool_cls:])]
        return dx if need_dx else None, *(d if d.dtype == keys_cls.dtype else d.to(keys_cls.dtype) for d in dkeys)
    dkeys = partials.sum(0)  # [E, C]: the sum over programs (fp32 partials), then the keys' dtype
    dkeys = dkeys if dkeys.dtype == keys_cls.dtype else dkeys.to(keys_cls.dtype)
    return dx if need_dx else None, *dkeys.split_with_sizes((pool_cls, keys_img.shape[-2]))


def match(x: Tensor, keys_cls: Tensor, keys_img: Tensor, num_prefix_tokens: int, k_cls: int, k_img: int,
          backend: str, tasks: Tensor | None = None, layouts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`match_select` without the argument checks, for the model path: ``(bits, terms)``.

    The caller guarantees what ``match_select`` checks, and contiguous keys: x ``[B, N, C]``, keys ``[Pc, C]`` and
    ``[Pi, C]`` (the pools' parameters; with tasks, int [B] in [0, T), a bank's ``[T, Pc, C]`` and
    ``[T, Pi, C]``) of one float dtype on x's device (Pc + Pi <= 64), 1 <= k_cls <= Pc, 1 <= k_img <= Pi,
    0 <= num_prefix_tokens <= N, backend "triton" (x not fp64) or "torch", resolved; layouts None or as
    ``match_select`` checks them.
    """
    terms, bits = MatchSelect.apply(x, keys_cls, keys_img, tasks, layouts, None, None, 0.0, False, num_prefix_tokens,
                                    k_cls, k_img, backend)
    return bits, terms


def norm_match(x: Tensor, keys_cls: Tensor, keys_img: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
               norm_eps: float, num_prefix_tokens: int, k_cls: int, k_img: int, backend: str,
               tasks: Tensor | None = None, layouts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`match` with the block's LayerNorm fused (one kernel each way): ``(h, bits, terms)``, h =
    ``F.layer_norm(x, (C,), norm_weight, norm_bias, norm_eps)`` in x's dtype. For the model path, unchecked as
    :func:`match`; norm_weight/norm_bias ``[C]`` or None must be frozen (no gradient is computed for them)."""
    terms, bits, h = MatchSelect.apply(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias, norm_eps, True,
                                       num_prefix_tokens, k_cls, k_img, backend)
    return h, bits, terms


def norm_match_select(x: Tensor, norm: torch.nn.LayerNorm, keys_cls: Tensor, keys_img: Tensor, *, topk_cls: int,
                      topk_img: int, num_prefix_tokens: int, backend: str, tasks: Tensor | None = None,
                      layouts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(norm(x), bits, terms)`` in one kernel each way: the block's frozen LayerNorm fused with the matching of x
    (both read the same rows). For the model path: inputs come from the block, the backend is resolved; only the
    norm's parameters are checked (frozen). The output h is in x's dtype (under autocast an fp32 x gives the fp32 h
    that ``F.layer_norm`` would give; a 16-bit x gives h in 16 bits, which is what the next linear layer casts it to
    under autocast anyway). With tasks (int [B]) the keys are a bank's, and layouts, as :func:`match_select` takes
    them."""
    if any(p is not None and p.requires_grad for p in (norm.weight, norm.bias)):
        raise ValueError("norm_weight/norm_bias: the fused layer norm takes frozen parameters (it computes no "
                         "gradient for them), got a tensor that requires grad; apply the norm outside the op")
    return norm_match(x, keys_cls.contiguous(), keys_img.contiguous(), norm.weight, norm.bias, norm.eps,
                      num_prefix_tokens, topk_cls, topk_img, backend, tasks, layouts)


def match_select(x: Tensor, keys_cls: Tensor, keys_img: Tensor, *, topk_cls: int, topk_img: int,
                 num_prefix_tokens: int = 1, backend: str = "auto", tasks: Tensor | None = None,
                 layouts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cosine matching, top-k selection and matching-loss terms of every token, in one pass over x.

    Args:
        x: ``[B, N, C]`` block input (residual stream before norm1, B >= 1); prefix tokens first. Norms and
            cosines are computed in fp32 (fp64 for fp64 x on the torch backend), under autocast too.
        keys_cls: ``[Pc, C]`` keys of the CLS pool (used by the first ``num_prefix_tokens`` tokens).
        keys_img: ``[Pi, C]`` keys of the image pool (used by the patch tokens). Pc + Pi <= 64.
        topk_cls, topk_img: entries each prefix / patch token selects (1..pool size).
        num_prefix_tokens: CLS + register/distillation tokens at the start of the sequence.
        backend: "auto" | "triton" | "torch".
        tasks: None, or int ``[B]``: the keys are a bank of T key sets (``[T, Pc, C]`` and ``[T, Pi, C]``) and
            sample b matches set ``tasks[b]`` (read in place by the kernels); each set's key gradient sums its
            samples'.
        layouts: None, or int ``[B, 6]``: each sample's ``(pool_cls, pool_img, k_cls, k_img, ...)`` inside the
            padded pools (tasks of a bank whose pools differ, ``Selection.layouts``; the prompt lengths of the last
            two columns are the attention's): sample b's prefix tokens
            choose ``layouts[b, 2]`` of the first ``layouts[b, 0]`` CLS entries, its patch tokens
            ``layouts[b, 3]`` of the first ``layouts[b, 1]`` image entries, each k at most topk_cls / topk_img; its
            loss terms are weighted by its own k.

    Returns:
        ``(bits, terms)``: int64 ``[B, N]`` selection words (bit e = pool entry e, CLS entries first; ties go to
        the lower entry index, NaN scores rank lowest) and ``[B, N]`` fp32 loss terms whose sum is the matching
        loss, differentiable in x and the keys.

    Example::

        bits, terms = match_select(x, keys_cls, keys_img, topk_cls=10, topk_img=10)
        loss = task_loss + 0.01 * terms.sum()
    """
    validate_match_inputs(x, keys_cls, keys_img, tasks is not None)
    if x.shape[0] < 1:
        raise ValueError(f"x: expected shape [B, N, C] with B >= 1 (the loss is a mean over the batch), got "
                         f"{describe(x)}")
    check_pool_config("", keys_cls.shape[-2], keys_img.shape[-2], topk_cls, topk_img, 1, 1, num_prefix_tokens,
                      x.shape[1])
    if tasks is not None:
        check_tasks(tasks, x.shape[0], keys_cls.shape[0], x.device)
    if layouts is not None:
        check_layouts(layouts, x.shape[0], (keys_cls.shape[-2], keys_img.shape[-2]), (topk_cls, topk_img), None,
                      x.device)
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"x: backend='triton' computes in fp32 and takes fp16/bf16/fp32, got {describe(x)}; "
                        "use backend='torch' for float64")
    return match(x, keys_cls.contiguous(), keys_img.contiguous(), num_prefix_tokens, topk_cls, topk_img, backend,
                 tasks, layouts)
