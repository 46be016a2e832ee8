"""Custom ops and autograd plumbing shared by the attention entry points (explicit mask, fused top-k, packed qkv).

Every custom op wraps exactly ONE kernel launch on CUDA (backend="triton"); with backend="torch" the same op runs
the chunked PyTorch math of ``_torch_attention``. ``torch.compile`` sees each op as one opaque node (no graph
break, no tracing into Triton or the interpreter), and the op census counts it as one launch. Whatever else the
backward does (allocating the gradient buffers, zero-filling the atomics' target, the batch sum of prompt partials,
casts) is plain aten outside the ops, visible to both. The backward ops write into gradient buffers their caller
allocates (``torch.empty``, no kernel), so no op returns memory it leaves partly unwritten.

Ops: ``attention_fwd`` (forward kernel), ``attention_bwd`` (backward kernel: dq, dk, dv and the prompt
gradients in one launch), ``topk_bits`` (selection kernel); ``ops/packed.py`` adds ``packed_attention_fwd``, the
forward kernel for qkv in timm's [B, N, 3, H, D] layout. The kernels take strides, so the backward op serves both
layouts.
"""

from types import ModuleType

import torch
from torch import Tensor

from tcpa_kernels._backend import kernels
from tcpa_kernels.ops import _torch_attention
from tcpa_kernels.ops.selection import Selection, topk_bits


def implementation(backend: str) -> ModuleType:
    """The attention launchers of ``backend``: the Triton kernels (``_attention_kernels``, imported on first use) or
    their chunked PyTorch twin; both modules have the same two functions."""
    return _torch_attention if backend == "torch" else kernels("_attention_kernels")


def refuse_double_backward(op: str) -> None:
    """Called first in a registered backward: the backward ops have no derivative of their own, so a backward run
    with create_graph=True (grad mode on) would hand back gradients silently missing second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: second-order gradients (backward with create_graph=True) are not supported "
                           "through this op; compute the gradient penalty without it or detach its inputs")


def accumulation_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """dtype of lse, delta and the prompt gradients before the cast: fp64 for fp64 on the torch backend, else fp32."""
    return torch.float64 if backend == "torch" and dtype == torch.float64 else torch.float32


@torch.library.custom_op("tcpa_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor, mask: Tensor | None,
                  bits: Tensor | None, pool_cls: int, len_cls: int, len_img: int, scale: float, renormalize: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """One launch of the forward kernel: (out [B, H, N, D], a transposed view of a contiguous [B, N, H, D] buffer;
    lse [B, H, N]). q/k/v [B, H, N, D] share (b, h, n) strides, prompt_k/prompt_v ([H, P, D] or [B, H, P, D]) share
    theirs, unit stride on D; the selection is a bool mask [B, N, P] or int64 selection words [B, N] with their pool
    layout (``Selection.op_args()``: the other one None)."""
    return implementation(backend).attention_forward(q, k, v, prompt_k, prompt_v,
                                                     Selection(mask, bits, pool_cls, len_cls, len_img), scale,
                                                     renormalize)


@attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, mask, bits, pool_cls, len_cls, len_img, scale, renormalize, backend):
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2), q.new_empty((B, H, N), dtype=accumulation_dtype(backend, q.dtype))


@torch.library.custom_op("tcpa_kernels::attention_bwd", mutates_args=("dq", "dk", "dv", "dprompt"))
def attention_bwd(dq: Tensor, dk: Tensor, dv: Tensor, dprompt: Tensor, grad_out: Tensor, q: Tensor, k: Tensor,
                  v: Tensor, prompt_k: Tensor, prompt_v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
                  bits: Tensor | None, pool_cls: int, len_cls: int, len_img: int, scale: float, renormalize: bool,
                  backend: str) -> None:
    """One launch of the backward kernel: writes dq, dk and dv ([B, H, N, D] sharing one (b, h, n) stride set
    with unit stride on D: views of a packed [B, N, 3, H, D] buffer, or their own) and the prompt gradients into
    dprompt (accumulation dtype): [B, 2, H, P, D] (per-sample gradients, or per-(b, h) partials of shared prompts
    that the caller sums over the batch), or [2, H, P, D] zero-filled, which gets their batch sum (atomics on
    CUDA; shared prompts only). grad_out and out ([B, H, N, D]) are read through their own strides."""
    implementation(backend).attention_backward(grad_out, q, k, v, prompt_k, prompt_v, out, lse,
                                               Selection(mask, bits, pool_cls, len_cls, len_img), scale, renormalize,
                                               dq, dk, dv, dprompt)


@attention_bwd.register_fake
def _(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits, pool_cls, len_cls, len_img,
      scale, renormalize, backend):
    return None


@torch.library.custom_op("tcpa_kernels::topk_bits", mutates_args=())
def topk_bits_op(scores: Tensor, num_prefix_tokens: int, pool_cls: int, k_cls: int, k_img: int,
                 backend: str) -> Tensor:
    return topk_bits(scores, num_prefix_tokens=num_prefix_tokens, pool_cls=pool_cls, k_cls=k_cls, k_img=k_img,
                     backend=backend)


@topk_bits_op.register_fake
def _(scores, num_prefix_tokens, pool_cls, k_cls, k_img, backend):
    return scores.new_empty(scores.shape[:2], dtype=torch.int64)


def attention_grads(dq: Tensor, dk: Tensor, dv: Tensor, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    prompt_k: Tensor, prompt_v: Tensor, out: Tensor, lse: Tensor, selection: Selection, scale: float,
                    renormalize: bool, backend: str, deterministic: bool) -> Tensor:
    """The attention backward: the backward op, with the aten work before and after it.

    Writes dq, dk, dv (``[B, H, N, D]`` buffers the caller allocates: views of one ``[B, N, 3, H, D]`` tensor, or
    not; dk and dv share strides). grad_out, q, k, v, out ``[B, H, N, D]``, prompt_k/prompt_v ``[H, P, D]`` or
    ``[B, H, P, D]``. Returns the gradients of (prompt_k, prompt_v) stacked on dim -4 (``[2, H, P, D]`` or
    ``[B, 2, H, P, D]``) in prompt_k's dtype. Shared prompts: per-(b, h) partials summed over the batch here
    (deterministic), or with ``deterministic=False`` (and torch's deterministic algorithms off) fp32 atomics on the
    Triton backend.
    """
    if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    shared = prompt_k.dim() == 3
    atomic = backend == "triton" and shared and not (deterministic or torch.are_deterministic_algorithms_enabled())
    acc_dtype = accumulation_dtype(backend, q.dtype)
    if atomic:
        dprompt = torch.zeros((2, H, P, D), dtype=acc_dtype, device=q.device)
    else:
        dprompt = torch.empty((B, 2, H, P, D), dtype=acc_dtype, device=q.device)
    attention_bwd(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, *selection.op_args(), scale,
                  renormalize, backend)
    if shared and not atomic:
        dprompt = dprompt.sum(0)  # [2, H, P, D]: the deterministic reduction over the batch
    return dprompt.to(prompt_k.dtype)


def shared_strides(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as they are if they share one stride set with unit stride on the last dim (timm's q/k/v views of
    one qkv tensor do), else contiguous copies: the kernels take one stride set per group."""
    if tensors[0].stride(-1) == 1 and all(t.stride() == tensors[0].stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def token_grad_buffers(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised dq, dk, dv for q [B, H, N, D]: transposed views of three [B, N, H, D] tensors (three, not one
    packed tensor: no gradient of the [B, H, N, D] entry points is larger than its input)."""
    B, H, N, D = q.shape
    return tuple(torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2) for _ in range(3))


def run_forward(ctx, backend, q, k, v, prompt_k, prompt_v, selection, scale, renormalize, deterministic):
    """Forward of the [B, H, N, D] autograd Functions; returns out [B, H, N, D] (a transposed view of [B, N, H, D])."""
    q, k, v = shared_strides(q, k, v)
    prompt_k, prompt_v = shared_strides(prompt_k, prompt_v)
    mask, bits, *layout = selection.op_args()
    out, lse = attention_fwd(q, k, v, prompt_k, prompt_v, mask, bits, *layout, scale, renormalize, backend)
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, mask, bits)
    ctx.config = (layout, scale, renormalize, backend, deterministic)
    return out


def run_backward(ctx, grad_out):
    """Grads of (q, k, v, prompt_k, prompt_v); None for inputs that need none."""
    q, k, v, prompt_k, prompt_v, out, lse, mask, bits = ctx.saved_tensors
    layout, scale, renormalize, backend, deterministic = ctx.config
    dq, dk, dv = token_grad_buffers(q)
    dprompt = attention_grads(dq, dk, dv, grad_out, q, k, v, prompt_k, prompt_v, out, lse,
                              Selection(mask, bits, *layout), scale, renormalize, backend, deterministic)
    grads = (dq, dk, dv, *dprompt.unbind(-4))
    return [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
