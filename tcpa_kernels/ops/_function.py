"""Kernel ops and the autograd plumbing shared by the attention entry points (explicit mask, fused top-k, packed qkv).

Each differentiable op is a ``torch.autograd.Function`` (``tcpa_attention._SelectedTCPAFunction``,
``fused.TCPAAttention``, ``packed.PackedAttention``, ``match_select.MatchSelect``) whose forward and backward
launch their kernels through *kernel ops*, one per launch. A kernel op (:class:`KernelOp`) is a
``torch.library.custom_op`` with a fake implementation and no autograd formula of its own, called in one of two
ways:

- under ``torch.compile`` or a TorchDispatchMode (``FakeTensorMode``, the op census, the tests' op logs): through
  the dispatcher, so dynamo sees one opaque node per launch (no graph break, no tracing into Triton or the
  interpreter), fake tensors get the fake implementation and the census counts one op per launch;
- in eager mode: the function it wraps, called directly (the Triton launcher, or its PyTorch twin on
  backend="torch"): the dispatcher round trip of a custom op costs more host time than the launch itself.

Whatever else the backward does (allocating the gradient buffers, zero-filling the atomics' target, the batch sum
of prompt partials, casts) is plain aten outside the ops, visible to both. The backward ops write into gradient
buffers their caller allocates (``torch.empty``, no kernel), so no op returns memory it leaves partly unwritten.
No op reads a tensor's value on the host or makes a CPU tensor, so CUDA graphs can capture all of it.

CPU host time, launches stubbed: one forward + backward of the model-path entries (no argument checks) at
q/k/v [2, 2, 8, 16], every Triton kernel a no-op, medians in us on this 2-core CPU (torch 2.14; the conditions of
``benchmarks/overhead.py``, the same launchers in all three wirings)::

    wiring                                                               packed_attention   match
    custom_op + register_autograd (every call through the dispatcher)          159            132
    autograd.Function calling the custom ops (the dispatched path)             127            101
    autograd.Function calling the launchers (eager mode, this module)            80             68
    F.scaled_dot_product_attention forward + backward, same q/k/v                49

The validated public ops in the same run: ``tcpa_packed_attention`` 219 before this wiring (which also called
``triton.cdiv`` and rebuilt the launch configuration on every call) -> 93 (1.9x SDPA's, the target being 2x),
``match_select`` 163 -> 77.

Ops: ``attention_fwd`` (forward kernel), ``attention_bwd`` (backward kernel: dq, dk, dv and the prompt
gradients in one launch), ``topk_bits`` (selection kernel); ``packed.py`` adds ``packed_attention_fwd``, the
forward kernel for qkv in timm's [B, N, 3, H, D] layout (the kernels take strides, so the backward op serves both
layouts), ``match_select.py`` the matching ops.
"""

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tcpa_kernels._backend import kernels
from tcpa_kernels.ops import _torch_attention
from tcpa_kernels.ops.selection import Selection, topk_bits


def traced() -> bool:
    """Whether torch.compile is tracing or a TorchDispatchMode is active: then kernel ops go through the dispatcher."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


class KernelOp(CustomOpDef):
    """A custom op wrapping one kernel launch whose eager call skips the dispatcher (see the module docstring). It
    is the CustomOpDef that ``torch.library.custom_op`` made, so ``register_fake``, ``opcheck`` and ``torch.ops``
    work on it as on any custom op."""

    launch: Callable[..., object]  # the wrapped function

    def __call__(self, *args):
        return super().__call__(*args) if traced() else self.launch(*args)


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: ``torch.library.custom_op(name, fn, mutates_args=...)`` as a :class:`KernelOp`."""
    def register(fn) -> KernelOp:
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.__class__ = KernelOp  # the same object (registered with the dispatcher), with KernelOp's __call__
        op.launch = fn
        return op
    return register


@functools.cache
def implementation(backend: str) -> ModuleType:
    """The attention launchers of ``backend``: the Triton kernels (``_attention_kernels``, imported on first use) or
    their chunked PyTorch twin; both modules have the same two functions."""
    return _torch_attention if backend == "torch" else kernels("_attention_kernels")


def refuse_double_backward(op: str) -> None:
    """Called first in a backward: the backward ops have no derivative of their own, so a backward run with
    create_graph=True (grad mode on) would hand back gradients silently missing second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: second-order gradients (backward with create_graph=True) are not supported "
                           "through this op; compute the gradient penalty without it or detach its inputs")


def accumulation_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """dtype of lse, delta and the prompt gradients before the cast: fp64 for fp64 on the torch backend, else fp32."""
    return torch.float64 if backend == "torch" and dtype == torch.float64 else torch.float32


@kernel_op("tcpa_kernels::attention_fwd")
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


@kernel_op("tcpa_kernels::attention_bwd", mutates_args=("dq", "dk", "dv", "dprompt"))
def attention_bwd(dq: Tensor, dk: Tensor, dv: Tensor, dprompt: Tensor, grad_out: Tensor, q: Tensor, k: Tensor,
                  v: Tensor, prompt_k: Tensor, prompt_v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
                  bits: Tensor | None, pool_cls: int, len_cls: int, len_img: int, scale: float, renormalize: bool,
                  backend: str) -> None:
    """One launch of the backward kernel: writes dq, dk and dv ([B, H, N, D] sharing one (b, h, n) stride set
    with unit stride on D: views of a packed [B, N, 3, H, D] buffer, or their own) and the prompt gradients into
    dprompt (accumulation dtype): [B, 2, H, P, D] (per-sample gradients, or per-(b, h) partials of shared prompts
    that the caller sums over the batch), or [2, H, P, D] zero-filled, which gets their batch sum (atomics on
    CUDA; shared prompts only). grad_out and out ([B, H, N, D], unit stride on D) are read through their own
    strides."""
    implementation(backend).attention_backward(grad_out, q, k, v, prompt_k, prompt_v, out, lse,
                                               Selection(mask, bits, pool_cls, len_cls, len_img), scale, renormalize,
                                               dq, dk, dv, dprompt)


@attention_bwd.register_fake
def _(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits, pool_cls, len_cls, len_img,
      scale, renormalize, backend):
    return None


@kernel_op("tcpa_kernels::topk_bits")
def topk_bits_op(scores: Tensor, num_prefix_tokens: int, pool_cls: int, k_cls: int, k_img: int,
                 backend: str) -> Tensor:
    """Selection words int64 [B, N] of scores [B, N, pool_cls + pool_img] (``selection.topk_bits``), one launch;
    not differentiable. For the model path: arguments unchecked, backend resolved."""
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
    not; they share strides). grad_out, q, k, v, out ``[B, H, N, D]``, prompt_k/prompt_v ``[H, P, D]`` or
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
    return dprompt if dprompt.dtype == prompt_k.dtype else dprompt.to(prompt_k.dtype)


def shared_strides(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as they are if they share one stride set with unit stride on the last dim (timm's q/k/v views of
    one qkv tensor do, as do prompt K/V views of one [P, 2, H, D] tensor), else contiguous copies: the kernels take
    one stride set per group."""
    strides = tensors[0].stride()
    if strides[-1] == 1 and all(t.stride() == strides for t in tensors[1:]):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def token_grad_buffers(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised dq, dk, dv for q [B, H, N, D]: transposed views of three [B, N, H, D] tensors (three, not one
    packed tensor: no gradient of the [B, H, N, D] entry points is larger than its input)."""
    B, H, N, D = q.shape
    return tuple(torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2) for _ in range(3))


def run_forward(ctx, q, k, v, prompt_k, prompt_v, mask, bits, layout, scale, renormalize, backend, deterministic):
    """Forward of the [B, H, N, D] autograd Functions (selection: mask or bits, and layout (pool_cls, len_cls,
    len_img)); returns out [B, H, N, D] (a transposed view of [B, N, H, D]). ``prompt_v`` None: ``prompt_k`` holds
    both, stacked on dim -4 (``[2, H, P, D]`` or ``[B, 2, H, P, D]``), and gets one stacked gradient."""
    ctx.stacked = prompt_v is None
    if ctx.stacked:
        prompt_k, prompt_v = prompt_k.unbind(-4)
    q, k, v = shared_strides(q, k, v)
    prompt_k, prompt_v = shared_strides(prompt_k, prompt_v)
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
    grads = (dq, dk, dv, dprompt, None) if ctx.stacked else (dq, dk, dv, *dprompt.unbind(-4))
    return [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
