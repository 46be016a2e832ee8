"""Kernel ops and the autograd plumbing shared by the attention entry points (explicit mask, fused top-k, packed qkv).

Each differentiable op is a ``torch.autograd.Function`` (``tcpa_attention._SelectedTCPAFunction``,
``fused.TCPAAttention``, ``packed.PackedAttention``, ``match_select.MatchSelect``) whose forward and backward
launch their kernels. Each launch is also a *kernel op* (:class:`KernelOp`): an op of the ``tcpa_kernels``
library namespace with a fake implementation and no autograd formula of its own, which runs its backend's launcher
(``implementation``; ``match_select._implementation``) with the same arguments but the backend. The Functions
reach a launch in one of two ways:

- under ``torch.compile`` or a TorchDispatchMode (``FakeTensorMode``, the op census, the tests' op logs): through
  the kernel op and the dispatcher, so dynamo sees one opaque node per launch (no graph break, no tracing into
  Triton or the interpreter), fake tensors get the fake implementation and the census counts one op per launch;
- in eager mode: the launcher itself (the Triton launcher, or its PyTorch twin on backend="torch"), called by the
  Function with the arguments it would give the op: the dispatcher round trip of a custom op costs more host time
  than the launch itself. A kernel op called directly in eager mode (``topk_bits_op``) skips the dispatcher too.

Whatever else the backward does (allocating the gradient buffers, zero-filling the atomics' target, the batch sum
of prompt partials, casts) is plain aten outside the ops, visible to both. The backward ops write into gradient
buffers their caller allocates (``torch.empty``, no kernel), so no op returns memory it leaves partly unwritten.
No op reads a tensor's value on the host or makes a CPU tensor, so CUDA graphs can capture all of it. The Triton
launchers read no view of their operands: strides, shifts and grids come from launch plans cached per shape and
strides (``_attention_kernels``, ``_match_kernels``).

CPU host time, launches stubbed: one forward + backward at q/k/v [2, 2, 8, 16] under ``benchmarks/overhead.py``
(every Triton kernel a no-op; medians in us on this 2-core CPU, torch 2.14, three runs each, before and after back
to back). Before: the Functions reached the launchers through the kernel ops' eager call, on views made to read
strides, with a Selection rebuilt and launch metadata assembled per call::

    entry                                          before        after    after / SDPA
    packed_attention (model path)                      94           55            1.00
    match (model path)                                 73           56            1.02
    tcpa_packed_attention (validated)                 108           69            1.26
    match_select (validated)                           83           66            1.20
    attention (model path, [B, H, N, D])              113           86            1.55
    norm_match (model path, LayerNorm fused)           85           66            1.19
    minimal autograd.Function of packed's shape        40           40            0.73
    F.scaled_dot_product_attention, same q/k/v         55           55            1.00

(attention's figure includes the [B, H, N, D] views of qkv the harness makes, and their backward, as the model
does; norm_match's the gradient of h.)

Ops: ``attention_fwd`` (forward kernel), ``attention_bwd`` (backward kernel: dq, dk, dv and the prompt
gradients in one launch), ``topk_bits`` (selection kernel); ``packed.py`` adds ``packed_attention_fwd`` and
``packed_attention_bwd``, the same kernels on timm's [B, N, 3, H, D] layout (the kernels take strides),
``match_select.py`` the matching ops.
"""

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tcpa_kernels._backend import cdiv, kernels, next_power_of_2, sm_count
from tcpa_kernels.ops import _torch_attention
from tcpa_kernels.ops.selection import sum_per_task, topk_bits


def traced() -> bool:
    """Whether torch.compile is tracing or a TorchDispatchMode is active: then kernel ops go through the dispatcher."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


_LIBRARY = torch.library.Library("tcpa_kernels", "DEF")  # the kernel ops' namespace


class KernelOp:
    """One kernel launch as an op of the ``tcpa_kernels`` namespace (``torch.ops.tcpa_kernels.<name>``; schema from
    the function's type hints), whose eager call skips the dispatcher (see the module docstring). The op is defined
    with ``torch.library.Library`` rather than ``torch.library.custom_op``: a dispatched call of it costs less than
    half of a custom_op's (~4 against ~10 us with 11 arguments, CPU), which is what a compiled graph pays per
    launch outside CUDA graphs. ``overload`` is the op for ``opcheck``; ``register_fake`` its fake kernel."""

    def __init__(self, name: str, launch: Callable[..., object], mutates_args: tuple[str, ...]):
        _LIBRARY.define(name + torch.library.infer_schema(launch, mutates_args=mutates_args))
        _LIBRARY.impl(name, launch, "CompositeExplicitAutograd")
        self.name = f"tcpa_kernels::{name}"
        self.overload = getattr(torch.ops.tcpa_kernels, name).default
        self.launch = launch
        functools.update_wrapper(self, launch)

    def __call__(self, *args):
        return self.overload(*args) if traced() else self.launch(*args)

    def register_fake(self, fake: Callable[..., object]) -> Callable[..., object]:
        return torch.library.register_fake(self.name, fake, lib=_LIBRARY)


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: the function as the :class:`KernelOp` ``tcpa_kernels::<name>``."""
    return lambda fn: KernelOp(name.removeprefix("tcpa_kernels::"), fn, mutates_args)


@functools.cache
def implementation(backend: str) -> ModuleType:
    """The attention launchers of ``backend``: the Triton kernels (``_attention_kernels``, imported on first use) or
    their chunked PyTorch twin. Both modules have the same four functions, each taking what its op below takes but
    the backend: ``attention_fwd(*args, backend)`` runs ``implementation(backend).attention_forward(*args)``, and so
    do ``attention_bwd`` / ``attention_backward``, ``packed_attention_fwd`` / ``packed_forward`` and
    ``packed_attention_bwd`` / ``packed_backward``. The autograd Functions call the launcher itself in eager mode,
    the op when ``traced()``."""
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
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor | None, mask: Tensor | None,
                  bits: Tensor | None, tasks: Tensor | None, layouts: Tensor | None, pool_cls: int, len_cls: int,
                  len_img: int, scale: float, renormalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """One launch of the forward kernel: (out [B, H, N, D], a transposed view of a contiguous [B, N, H, D] buffer;
    lse [B, H, N]). q/k/v [B, H, N, D] share (b, h, n) strides, prompt_k/prompt_v ([H, P, D] or [B, H, P, D]) share
    theirs, unit stride on D; or prompt_v None and prompt_k both, stacked on dim -4 (``[2, H, P, D]`` or
    ``[B, 2, H, P, D]``, ``read_in_place``); with tasks (int [B]) a bank of prompt sets, [T, ...] in place of
    [B, ...], sample b reading set tasks[b]; with layouts (int [B, 6]) each sample's own pools inside the padded
    ones. The selection is a bool mask [B, N, P] or int64 selection words [B, N] with their pool layout
    (``Selection.op_args()``: the other one None)."""
    return implementation(backend).attention_forward(q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts,
                                                     pool_cls, len_cls, len_img, scale, renormalize)


@attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize,
      backend):
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2), q.new_empty((B, H, N), dtype=accumulation_dtype(backend, q.dtype))


@kernel_op("tcpa_kernels::attention_bwd", mutates_args=("dq", "dk", "dv", "dprompt"))
def attention_bwd(dq: Tensor, dk: Tensor, dv: Tensor, dprompt: Tensor, grad_out: Tensor, q: Tensor, k: Tensor,
                  v: Tensor, prompt_k: Tensor, prompt_v: Tensor | None, out: Tensor, lse: Tensor, mask: Tensor | None,
                  bits: Tensor | None, tasks: Tensor | None, layouts: Tensor | None, pool_cls: int, len_cls: int,
                  len_img: int, scale: float, renormalize: bool, backend: str) -> None:
    """One launch of the backward kernel: writes dq, dk and dv ([B, H, N, D] sharing one (b, h, n) stride set
    with unit stride on D) and the prompt gradients into dprompt (``prompt_grad_buffer``); the other tensors as
    ``attention_fwd`` takes them, grad_out and out ([B, H, N, D], unit stride on D) read through their own
    strides."""
    implementation(backend).attention_backward(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse,
                                               mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                                               renormalize)


@attention_bwd.register_fake
def _(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits, tasks, layouts, pool_cls,
      len_cls, len_img, scale, renormalize, backend):
    return None


@kernel_op("tcpa_kernels::topk_bits")
def topk_bits_op(scores: Tensor, layouts: Tensor | None, num_prefix_tokens: int, pool_cls: int, k_cls: int, k_img: int,
                 backend: str) -> Tensor:
    """Selection words int64 [B, N] of scores [B, N, pool_cls + pool_img] (``selection.topk_bits``; layouts int
    [B, 6] or None), one launch; not differentiable. For the model path: arguments unchecked, backend resolved."""
    return topk_bits(scores, num_prefix_tokens=num_prefix_tokens, pool_cls=pool_cls, k_cls=k_cls, k_img=k_img,
                     backend=backend, layouts=layouts)


@topk_bits_op.register_fake
def _(scores, layouts, num_prefix_tokens, pool_cls, k_cls, k_img, backend):
    return scores.new_empty(scores.shape[:2], dtype=torch.int64)


def operand_class(dtype: torch.dtype) -> str:
    """The attention kernels' operand class of a dtype: "fp32" or "16-bit"."""
    return "fp32" if dtype == torch.float32 else "16-bit"


@functools.cache
def config_key(D: int, dtype: torch.dtype) -> tuple[str, int]:
    """The attention kernels' launch-table entry (``_attention_kernels.LAUNCH_CONFIGS``) of head dim D and operand
    dtype: (operand class, padded head dim)."""
    return operand_class(dtype), max(64, next_power_of_2(D))


# the backward variants that walk several batch entries per program (GROUPED) without spilling, by table entry
GROUPED_BACKWARD = {("16-bit", 64)}


def batch_group(B: int, H: int, D: int, dtype: torch.dtype, sms: int | None) -> int:
    """Batch entries one backward program walks for a head when the prompts are shared (Triton, deterministic): as
    many as keep at least two programs per SM (``sms``; off CUDA, None: one), so the prompt-gradient partials the
    batch sum reads are that many times fewer; the opposite case, fewer programs than that, splits the key tiles
    instead (``_attention_kernels.key_splits``). Only where the walking kernel fits in registers without spilling
    (sm_90 compile report: 16-bit operands, head dims up to 64); elsewhere one entry per program."""
    if sms is None or config_key(D, dtype) not in GROUPED_BACKWARD:
        return 1
    return max(1, B * H // (2 * sms))


def prompt_grad_buffer(shared: bool, B: int, H: int, P: int, D: int, dtype: torch.dtype, device: torch.device,
                       backend: str, deterministic: bool) -> Tensor:
    """The backward ops' prompt-gradient buffer (accumulation dtype, contiguous) for tokens of ``dtype``:
    ``[B, 2, H, P, D]`` uninitialised (per-sample gradients, or on the torch backend per-(b, h) partials of shared
    prompts); for shared prompts on the Triton backend ``[G, 2, H, P, D]``, one partial per group of
    ``batch_group`` consecutive entries (the kernel reads the group size off G), or with
    ``deterministic=False`` (and torch's deterministic algorithms off) ``[2, H, P, D]`` zero-filled, the target of
    fp32 atomics."""
    acc_dtype = accumulation_dtype(backend, dtype)
    if shared and backend == "triton":
        if not (deterministic or torch.are_deterministic_algorithms_enabled()):
            return torch.zeros((2, H, P, D), dtype=acc_dtype, device=device)
        B = cdiv(B, batch_group(B, H, D, dtype, sm_count(device)))
    return torch.empty((B, 2, H, P, D), dtype=acc_dtype, device=device)


def prompt_grads(dprompt: Tensor, shared: bool, dtype: torch.dtype, tasks: Tensor | None = None,
                 num_sets: int = 0) -> Tensor:
    """The stacked prompt gradients (``[2, H, P, D]`` or ``[B, 2, H, P, D]``, in ``dtype``) from the buffer the
    backward op wrote: shared prompts' per-(b, h) partials summed over the batch here (deterministic); with
    ``tasks`` (int [B]) the per-sample gradients summed per prompt set of the bank, ``[num_sets, 2, H, P, D]``:
    ``selection.sum_per_task``."""
    if tasks is not None:
        dprompt = sum_per_task(dprompt, tasks, num_sets)
    elif shared and dprompt.dim() == 5:
        dprompt = dprompt.sum(0)
    return dprompt if dprompt.dtype == dtype else dprompt.to(dtype)


def shared_strides(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as they are if they share one stride set with unit stride on the last dim (timm's q/k/v views of
    one qkv tensor do, as do prompt K/V views of one [P, 2, H, D] tensor), else contiguous copies: the kernels take
    one stride set per group."""
    strides = tensors[0].stride()
    if strides[-1] == 1 and all(t.stride() == strides for t in tensors[1:]):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def read_in_place(t: Tensor, dim: int) -> Tensor:
    """t as it is if the kernels can read it through one pointer: unit stride on the last dim, and its slices along
    ``dim`` (q, k, v of qkv ``[B, N, 3, H, D]``: dim 2; prompt K, V of ``[2, H, P, D]`` or ``[B, 2, H, P, D]``: dim
    -4) a whole number of head strides apart, or one head (timm's qkv view, prompt K/V permuted from a
    ``[.., P, 2, H, D]`` tensor and contiguous tensors are); else a contiguous copy."""
    strides = t.stride()
    head = strides[dim + 1]
    if strides[-1] == 1 and (t.shape[dim + 1] == 1 or (head and strides[dim] % head == 0)):
        return t
    return t.contiguous()


def token_grad_buffers(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised dq, dk, dv laid out as the forward's out [B, H, N, D] (transposed views of [B, N, H, D] buffers,
    one ``empty_like`` each): three tensors, not one packed tensor, as no gradient of the [B, H, N, D] entry points
    is larger than its input."""
    return torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)


def attention_grads(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor | None,
                    out: Tensor, lse: Tensor, selection: tuple, scale: float, renormalize: bool, backend: str,
                    deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The [B, H, N, D] attention backward: the backward op (or in eager mode its launcher), with the aten work
    before and after it. Tensors as ``attention_bwd`` takes them, ``selection`` its (mask, bits, tasks, layouts,
    pool_cls, len_cls, len_img). Returns dq, dk, dv (``token_grad_buffers``) and the gradients of (prompt_k,
    prompt_v) stacked on dim -4 (``[2, H, P, D]``, ``[B, 2, H, P, D]`` or with tasks ``[T, 2, H, P, D]``) in
    prompt_k's dtype (``prompt_grads``)."""
    if grad_out.stride()[-1] != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    B, H, N, D = q.shape
    tasks = selection[2]
    shared = tasks is None and prompt_k.dim() == (3 if prompt_v is not None else 4)
    dq, dk, dv = token_grad_buffers(out)
    dprompt = prompt_grad_buffer(shared, B, H, prompt_k.shape[-2], D, q.dtype, q.device, backend, deterministic)
    args = (dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, *selection, scale, renormalize)
    if traced():
        attention_bwd(*args, backend)
    else:
        implementation(backend).attention_backward(*args)
    return dq, dk, dv, prompt_grads(dprompt, shared, prompt_k.dtype, tasks, prompt_k.shape[0])


def run_forward(ctx, q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, layout, scale, renormalize, backend,
                deterministic):
    """Forward of the [B, H, N, D] autograd Functions (selection: mask or bits, tasks and layouts or None, and
    layout (pool_cls, len_cls, len_img)); returns out [B, H, N, D] (a transposed view of [B, N, H, D]).
    ``prompt_v`` None: ``prompt_k`` holds both, stacked on dim -4 (``[2, H, P, D]`` or ``[B, 2, H, P, D]``), and
    gets one stacked gradient."""
    q, k, v = shared_strides(q, k, v)
    if prompt_v is None:
        prompt_k = read_in_place(prompt_k, -4)
    else:
        prompt_k, prompt_v = shared_strides(prompt_k, prompt_v)
    args = (q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, *layout, scale, renormalize)
    out, lse = attention_fwd(*args, backend) if traced() else implementation(backend).attention_forward(*args)
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, mask, bits, tasks, layouts)
    ctx.config = (layout, scale, renormalize, backend, deterministic)
    return out


def run_backward(ctx, grad_out):
    """Grads of (q, k, v, prompt_k, prompt_v); None for inputs that need none."""
    q, k, v, prompt_k, prompt_v, out, lse, mask, bits, tasks, layouts = ctx.saved_tensors
    layout, scale, renormalize, backend, deterministic = ctx.config
    dq, dk, dv, dprompt = attention_grads(grad_out, q, k, v, prompt_k, prompt_v, out, lse,
                                          (mask, bits, tasks, layouts, *layout), scale, renormalize, backend,
                                          deterministic)
    grads = (dq, dk, dv, dprompt, None) if prompt_v is None else (dq, dk, dv, *dprompt.unbind(-4))
    return [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
