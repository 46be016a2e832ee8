"""``tcpa_packed_attention``: prompt-augmented attention (docs/how-it-works.md, 'Attention') on timm's fused qkv layout.

A timm block computes ``qkv = attn.qkv(h)`` (``[B, N, 3*C]``) and its ``attn.proj`` reads ``[B, N, C]``. This
entry reads q, k, v in place from the ``[B, N, 3, H, D]`` view of that tensor, writes the output as the
``[B, N, H*D]`` tensor proj reads, and its backward writes dq, dk, dv straight into one ``[B, N, 3, H, D]``
gradient buffer: no permute copy, no output transpose copy, no stack/clone of the gradients.

It runs the kernels of ``tcpa_attention`` (they take strides) through its own two ops,
``tcpa_kernels::packed_attention_fwd`` and ``tcpa_kernels::packed_attention_bwd`` (one launch each, what
torch.compile records on the packed layout), whose launchers (``packed_forward``, ``packed_backward``) compute the
kernels' strides from the packed tensors' own. ``PackedAttention``, its autograd Function, takes qkv and prompt_kv
as single inputs (one gradient tensor each) and saves them as they are. ``tcpa_packed_attention`` checks its
arguments and calls ``packed_attention``, the entry of the model path.
"""

import math

import torch
from torch import Tensor

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import KERNEL_DTYPES, check_flag, check_number, check_tensor, describe
from tcpa_kernels.ops._function import (
    accumulation_dtype,
    implementation,
    kernel_op,
    prompt_grad_buffer,
    prompt_grads,
    read_in_place,
    refuse_double_backward,
    traced,
)
from tcpa_kernels.ops.selection import Selection, check_selection, check_tasks
from tcpa_kernels.ops.tcpa_attention import TORCH_DTYPES, check_kernel_limits


@kernel_op("tcpa_kernels::packed_attention_fwd")
def packed_attention_fwd(qkv: Tensor, prompt_kv: Tensor, mask: Tensor | None, bits: Tensor | None,
                         tasks: Tensor | None, layouts: Tensor | None, pool_cls: int, len_cls: int, len_img: int,
                         scale: float, renormalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """One launch of the forward kernel on qkv ``[B, N, 3, H, D]`` and prompt_kv ``[2, H, P, D]`` or
    ``[B, 2, H, P, D]`` (with tasks, int [B], a bank's ``[T, 2, H, P, D]``), both read in place
    (``read_in_place``): (out ``[B, N, H*D]`` contiguous, lse ``[B, H, N]``)."""
    return implementation(backend).packed_forward(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls,
                                                  len_img, scale, renormalize)


@packed_attention_fwd.register_fake
def _(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize, backend):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=accumulation_dtype(backend, qkv.dtype))


@kernel_op("tcpa_kernels::packed_attention_bwd", mutates_args=("dqkv", "dprompt"))
def packed_attention_bwd(dqkv: Tensor, dprompt: Tensor, grad_out: Tensor, qkv: Tensor, prompt_kv: Tensor, out: Tensor,
                         lse: Tensor, mask: Tensor | None, bits: Tensor | None, tasks: Tensor | None,
                         layouts: Tensor | None, pool_cls: int, len_cls: int, len_img: int, scale: float,
                         renormalize: bool, backend: str) -> None:
    """One launch of the backward kernel on the packed layouts: writes dq, dk, dv into dqkv ``[B, N, 3, H, D]``
    (``read_in_place``) and the prompt gradients into dprompt (``_function.prompt_grad_buffer``); grad_out and out
    ``[B, N, H*D]`` with unit stride on the last dim."""
    implementation(backend).packed_backward(dqkv, dprompt, grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks,
                                            layouts, pool_cls, len_cls, len_img, scale, renormalize)


@packed_attention_bwd.register_fake
def _(dqkv, dprompt, grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks, layouts, pool_cls, len_cls, len_img,
      scale, renormalize, backend):
    return None


_NO_GRADS = (None,) * 11  # PackedAttention's gradients of the selection, layouts, layout and flags


class PackedAttention(torch.autograd.Function):
    """``apply(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize, backend,
    deterministic)``
    -> out ``[B, N, H*D]``: the forward kernel, and the backward kernel writing dq, dk, dv into one
    ``[B, N, 3, H, D]`` gradient buffer (qkv and prompt_kv as ``read_in_place`` leaves them). Eager mode calls the
    launchers, a traced call the ops (``_function.implementation``)."""

    @staticmethod
    def forward(ctx, qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize,
                backend, deterministic):
        out, lse = run_packed_forward(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                                      renormalize, backend)
        ctx.save_for_backward(qkv, prompt_kv, out, lse, mask, bits, tasks, layouts)
        ctx.config = (pool_cls, len_cls, len_img, scale, renormalize, backend, deterministic)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Gradients of qkv (one contiguous [B, N, 3, H, D] buffer) and of prompt_kv."""
        refuse_double_backward("tcpa_packed_attention")
        return *packed_grads(grad_out, *ctx.saved_tensors, *ctx.config), *_NO_GRADS


def run_packed_forward(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize,
                       backend):
    """``packed_attention_fwd`` (traced) or its launcher (eager): (out [B, N, H*D], lse)."""
    args = (qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize)
    return packed_attention_fwd(*args, backend) if traced() else implementation(backend).packed_forward(*args)


def packed_grads(grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                 renormalize, backend, deterministic):
    """The packed backward: (dqkv, one contiguous [B, N, 3, H, D] tensor; the gradient of prompt_kv, its shape and
    dtype: with tasks the per-sample gradients summed per prompt set)."""
    if grad_out.stride()[-1] != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    B, N, _, H, D = qkv.shape
    shared = tasks is None and prompt_kv.dim() == 4
    device = qkv.device
    dqkv = torch.empty((B, N, 3, H, D), dtype=qkv.dtype, device=device)
    dprompt = prompt_grad_buffer(shared, B, H, prompt_kv.shape[-2], D, qkv.dtype, device, backend, deterministic)
    args = (dqkv, dprompt, grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks, layouts, pool_cls, len_cls, len_img,
            scale, renormalize)
    if traced():
        packed_attention_bwd(*args, backend)
    else:
        implementation(backend).packed_backward(*args)
    return dqkv, prompt_grads(dprompt, shared, prompt_kv.dtype, tasks, prompt_kv.shape[0])


def packed_attention(qkv: Tensor, prompt_kv: Tensor, selection: Selection, scale: float, renormalize: bool,
                     backend: str, deterministic: bool) -> Tensor:
    """:func:`tcpa_packed_attention` without the argument checks, for the model path: returns ``[B, N, H*D]``.

    The caller guarantees what ``tcpa_packed_attention`` checks: qkv ``[B, N, 3, H, D]`` (fp16/bf16/fp32, fp64 on
    the torch backend), prompt_kv ``[2, H, P, D]`` or ``[B, 2, H, P, D]`` on qkv's device in qkv's dtype or fp32,
    ``selection`` a :class:`Selection` for these B, N, P, scale a float > 0, renormalize and deterministic bools,
    backend "triton" or "torch" (resolved) within the Triton limits of ``check_kernel_limits``. Both tensors are
    read in place when D has unit stride and their slices (q, k, v; prompt K, V) lie a whole number of head strides
    apart (``read_in_place``: timm's qkv view; prompt K/V as a permuted view of a ``[P, 2, H, D]`` or
    ``[B, P, 2, H, D]`` tensor), else copied once.
    """
    return PackedAttention.apply(read_in_place(qkv, 2), read_in_place(prompt_kv, -4), *selection.op_args(), scale,
                                 renormalize, backend, deterministic)


def tcpa_packed_attention(qkv: Tensor, prompt_kv: Tensor, selection: Selection, *, scale: float, renormalize: bool,
                          backend: str, deterministic: bool = True) -> Tensor:
    """Prompt-augmented attention of N query tokens over [P prompts ; N tokens] keys, on timm's qkv layout.

    Args:
        qkv: ``[B, N, 3, H, D]``, the view ``attn.qkv(h).view(B, N, 3, H, D)`` of timm's qkv projection (any
            strides with unit stride on D are read in place); fp16/bf16/fp32, fp64 on the torch backend.
        prompt_kv: prompt keys and values ``[2, H, P, D]`` shared by the batch, or ``[B, 2, H, P, D]``, or with
            ``selection.tasks`` a bank of T prompt sets ``[T, 2, H, P, D]`` (sample b reads set ``tasks[b]`` in
            place); fp32 or qkv's dtype (the Triton kernels cast fp32 prompts to qkv's dtype after loading them: no
            cast copy).
        selection: which prompts each token may use: selection words (int64 ``[B, N]``, bit e = pool entry e, with
            the pool layout pool_cls/len_cls/len_img) or a bool mask ``[B, N, P]``; optionally ``tasks`` (int32 or
            int64 ``[B]``, values in [0, T)).
        scale: score scale, a finite number > 0 (``attn.scale``, usually ``D ** -0.5``).
        renormalize: False (the published method): unselected prompts stay in the softmax normaliser but add no
            value. True: ordinary masked softmax.
        backend: "triton" or "torch", already resolved (``tcpa_kernels._backend.resolve_backend``).
        deterministic: shared-prompt gradients by a fixed-order reduction over the batch (True) or fp32 atomics.

    Returns:
        ``[B, N, H*D]`` contiguous, in qkv's dtype: what ``attn.proj`` reads. Differentiable in qkv (its gradient
        is one contiguous ``[B, N, 3, H, D]`` tensor) and prompt_kv (gradient of its shape and dtype; with tasks
        each set's gradient sums its samples').
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend: expected 'triton' or 'torch' (resolved), got {backend!r}")
    scale = check_number("scale", scale, lo=0.0, hi=math.inf, lo_open=True)
    check_flag("renormalize", renormalize)
    check_flag("deterministic", deterministic)
    check_tensor("qkv", qkv, ndim=5, dtypes=KERNEL_DTYPES if backend == "triton" else TORCH_DTYPES)
    backend = resolve_backend(backend, qkv.device)
    B, N, three, H, D = qkv.shape
    if three != 3:
        raise ValueError(f"qkv: expected shape [B, N, 3, H, D], got {describe(qkv)}")
    if H < 1 or D < 1:
        raise ValueError(f"qkv: expected shape [B, N, 3, H, D] with H >= 1 heads of head dim D >= 1, got "
                         f"{describe(qkv)}")
    check_tensor("prompt_kv", prompt_kv, ndim=(4, 5), dtypes=tuple(dict.fromkeys((torch.float32, qkv.dtype))))
    P = prompt_kv.shape[-2]
    bank = isinstance(selection, Selection) and selection.tasks is not None
    lead = (max(1, prompt_kv.shape[0]), 2, H) if bank else (2, H) if prompt_kv.dim() == 4 else (B, 2, H)
    if prompt_kv.device != qkv.device or tuple(prompt_kv.shape) != (*lead, P, D) or P < 1:
        expected = "[T, 2, H, P, D] with selection.tasks" if bank else "[2, H, P, D] or [B, 2, H, P, D]"
        raise ValueError(f"prompt_kv: expected shape {(*lead, 'P >= 1', D)} on {qkv.device} ({expected}), got "
                         f"{describe(prompt_kv)}")
    check_selection(selection, B, N, P, qkv.device)
    if bank:
        check_tasks(selection.tasks, B, prompt_kv.shape[0], qkv.device)
    check_kernel_limits("qkv", qkv, backend, (B, H, N, P, D), qkv.stride(1))
    return packed_attention(qkv, prompt_kv, selection, scale, renormalize, backend, deterministic)
