"""``tcpa_attention``: prompt-augmented attention with an explicit boolean prompt mask (docs/how-it-works.md,
'Attention')."""

import math

import torch

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import (
    KERNEL_DTYPES,
    check_attention_inputs,
    check_flag,
    check_number,
    check_tensor,
    describe,
)
from tcpa_kernels.ops._function import refuse_double_backward, run_backward, run_forward
from tcpa_kernels.ops.selection import Selection, check_selection, check_tasks

TORCH_DTYPES = (*KERNEL_DTYPES, torch.float64)
MAX_KERNEL_HEAD_DIM = 128
INT32_LIMIT = 2**31


class _SelectedTCPAFunction(torch.autograd.Function):
    """[B, H, N, D] prompt-augmented attention, one kernel launch each way (``_function.run_forward`` and
    ``run_backward``: the kernel ops of ``_function.py``, or their launchers in eager mode):
    ``apply(q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize,
    backend, deterministic)`` -> out [B, H, N, D]."""

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                renormalize, backend, deterministic):
        return run_forward(ctx, q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, (pool_cls, len_cls, len_img),
                           scale, renormalize, backend, deterministic)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("tcpa_attention")
        return (*run_backward(ctx, grad_out), *([None] * 11))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_kv: torch.Tensor, selection: Selection,
              scale: float, renormalize: bool, backend: str, deterministic: bool) -> torch.Tensor:
    """:func:`tcpa_attention` without the argument checks, for the model path, with the prompt keys and values in
    one tensor: returns out ``[B, H, N, D]``; the gradient of ``prompt_kv`` is one tensor of its shape.

    The caller guarantees what ``tcpa_attention`` checks: q, k, v ``[B, H, N, D]`` of one dtype and device (any
    strides; read in place when they share one stride set with unit stride on D), prompt_kv ``[2, H, P, D]`` or
    ``[B, 2, H, P, D]`` on q's device in q's dtype or fp32 (cast on load, no copy), read in place with unit stride
    on D and V a whole number of head strides after K (``_function.read_in_place``: e.g. a permuted view of a
    ``[P, 2, H, D]`` tensor), else copied once; ``selection`` a :class:`Selection` for these B, N, P;
    scale a float > 0, renormalize and deterministic bools; backend "triton" or "torch" (resolved) within the Triton
    limits of :func:`check_kernel_limits`.
    """
    return _SelectedTCPAFunction.apply(q, k, v, prompt_kv, None, *selection.op_args(), scale, renormalize, backend,
                                       deterministic)


def check_kernel_limits(name, t, backend, dims, row_stride):
    """The Triton backend's limits, reported against argument ``name`` (tensor t): head dim <= 128, the forward's
    1-D grid (one program per (batch, head, query block) of at least 16 rows) within 2^31 - 1 programs, and
    offsets inside one (batch, head) slice within int32 (the slice base is int64) for every operand: q/k/v rows
    ``row_stride`` apart, the [B, N, H, D] output and [B, N, 3, H, D] gradient buffers, the prompts, the mask."""
    if backend != "triton":
        return
    B, H, N, P, D = dims
    if D > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"{name}: head dim must be <= {MAX_KERNEL_HEAD_DIM} for backend='triton', got "
                         f"{describe(t)}; use backend='torch'")
    programs = B * H * -(-N // 16)
    if programs >= INT32_LIMIT:
        raise ValueError(f"{name}: B*H*ceil(N/16) = {programs} forward programs, the grid holds < {INT32_LIMIT}; "
                         f"got {describe(t)}; use backend='torch' or split the batch")
    largest_in_slice = max(N * max(row_stride, 3 * H * D), P * D, N * P)
    if largest_in_slice >= INT32_LIMIT:
        raise ValueError(f"{name}: one (batch, head) slice spans {largest_in_slice} elements, the kernels index it "
                         f"with int32 (< {INT32_LIMIT}); got {describe(t)}, prompts P={P}; use backend='torch'")


def prepare_attention(q, k, v, prompt_k, prompt_v, backend, scale, renormalize, deterministic, bank=False):
    """Validate the attention arguments (``bank``: prompt K/V [T, H, P, D], a prompt set per task); return
    (backend, scale, (B, H, N, P, D))."""
    check_flag("renormalize", renormalize)
    check_flag("deterministic", deterministic)
    backend = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    dims = check_attention_inputs(q, k, v, prompt_k, prompt_v, KERNEL_DTYPES if backend == "triton" else TORCH_DTYPES,
                                  bank)
    check_kernel_limits("q", q, backend, dims, max(q.stride(2), k.stride(2), v.stride(2)))
    if scale is None:
        return backend, 1.0 / math.sqrt(dims[-1]), dims
    return backend, check_number("scale", scale, lo=0.0, hi=math.inf, lo_open=True), dims


def tcpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor,
                   prompt_mask: torch.Tensor | Selection, *, scale: float | None = None, renormalize: bool = False,
                   backend: str = "auto", deterministic: bool = True) -> torch.Tensor:
    """Prompt-augmented attention of N query tokens over [P prompts ; N tokens] keys.

    Args:
        q, k, v: ``[B, H, N, D]`` queries, keys and values of the real tokens (fp16/bf16/fp32; fp64 on the
            torch backend). Any b/h/n strides are read in place when q, k, v share them (timm's fused qkv).
        prompt_k, prompt_v: ``[H, P, D]`` prompt keys/values shared by the batch, or ``[B, H, P, D]``; with a
            Selection's ``tasks`` a bank of T prompt sets ``[T, H, P, D]``, sample b reading set ``tasks[b]``.
        prompt_mask: bool ``[B, N, P]``, True where token n may use prompt p; or a
            :class:`~tcpa_kernels.ops.selection.Selection` (selection words ``[B, N]`` with their pool layout, as
            ``match_select`` returns them: no mask is built; optionally ``tasks``, int ``[B]``).
        scale: score scale (a finite number > 0), default ``1/sqrt(D)``.
        renormalize: False (default, the published method): unselected prompts stay in the softmax
            normaliser but contribute no value. True: ordinary masked softmax.
        backend: "auto" (Triton on CUDA where triton is installed, torch elsewhere), "triton" or "torch".
        deterministic: shared-prompt gradients by a fixed-order reduction (True) or fp32 atomics (False).

    Returns:
        ``[B, H, N, D]`` in q's dtype (a transposed view of a contiguous ``[B, N, H, D]`` tensor, so
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free); differentiable in q, k, v, prompt_k, prompt_v (with
        tasks: each set's gradient sums its samples').
    """
    tasks = prompt_mask.tasks if isinstance(prompt_mask, Selection) else None
    backend, scale, (B, H, N, P, D) = prepare_attention(q, k, v, prompt_k, prompt_v, backend, scale, renormalize,
                                                        deterministic, tasks is not None)
    if isinstance(prompt_mask, Selection):
        check_selection(prompt_mask, B, N, P, q.device)
        if tasks is not None:
            check_tasks(tasks, B, prompt_k.shape[0], q.device)
        selection = prompt_mask
    else:
        check_tensor("prompt_mask", prompt_mask, ndim=3, dtypes=(torch.bool,))
        if prompt_mask.device != q.device or tuple(prompt_mask.shape) != (B, N, P):
            raise ValueError(f"prompt_mask: expected bool shape {(B, N, P)} on {q.device}, "
                             f"got {describe(prompt_mask)}")
        selection = Selection(mask=prompt_mask)
    return _SelectedTCPAFunction.apply(q, k, v, prompt_k, prompt_v, *selection.op_args(), scale, renormalize, backend,
                                       deterministic)

