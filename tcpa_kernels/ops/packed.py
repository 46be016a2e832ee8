"""``tcpa_packed_attention``: prompt-augmented attention (TCPA_SPEC.md §3) on timm's fused qkv layout.

A timm block computes ``qkv = attn.qkv(h)`` (``[B, N, 3*C]``) and its ``attn.proj`` reads ``[B, N, C]``. This
entry reads q, k, v in place from the ``[B, N, 3, H, D]`` view of that tensor, writes the output as the
``[B, N, H*D]`` tensor proj reads, and its backward writes dq, dk, dv straight into one ``[B, N, 3, H, D]``
gradient buffer: no permute copy, no output transpose copy, no stack/clone of the gradients.

It runs the kernels and the backward op of ``tcpa_attention`` (they take strides); only the forward op is its own
(``tcpa_kernels::packed_attention_fwd``: what torch.compile records for the forward launch on the packed layout).
``PackedAttention``, its autograd Function, takes qkv and prompt_kv as single inputs (one gradient tensor each);
in eager mode its forward launches the kernel itself, on the [B, H, N, D] views it saves for the backward.
``tcpa_packed_attention`` checks its arguments and calls ``packed_attention``, the entry of the model path.
"""

import math

import torch
from torch import Tensor

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import KERNEL_DTYPES, check_flag, check_number, check_tensor, describe
from tcpa_kernels.ops._function import (
    accumulation_dtype,
    attention_grads,
    implementation,
    kernel_op,
    refuse_double_backward,
    shared_strides,
    traced,
)
from tcpa_kernels.ops.selection import Selection, check_selection
from tcpa_kernels.ops.tcpa_attention import TORCH_DTYPES, check_kernel_limits


def _split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3, H, D] -> q, k, v [B, H, N, D] views sharing one stride set."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D] view."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


@kernel_op("tcpa_kernels::packed_attention_fwd")
def packed_attention_fwd(qkv: Tensor, prompt_kv: Tensor, mask: Tensor | None, bits: Tensor | None, pool_cls: int,
                         len_cls: int, len_img: int, scale: float, renormalize: bool,
                         backend: str) -> tuple[Tensor, Tensor]:
    """One launch of the forward kernel on qkv ``[B, N, 3, H, D]`` and prompt_kv ``[2, H, P, D]`` or
    ``[B, 2, H, P, D]``, both read in place (unit stride on D): (out ``[B, N, H*D]`` contiguous, lse ``[B, H, N]``)."""
    out, lse = implementation(backend).attention_forward(*_split_qkv(qkv), *prompt_kv.unbind(-4),
                                                         Selection(mask, bits, pool_cls, len_cls, len_img), scale,
                                                         renormalize)
    return out.transpose(1, 2).flatten(2), lse  # a view of the contiguous [B, N, H, D] buffer


@packed_attention_fwd.register_fake
def _(qkv, prompt_kv, mask, bits, pool_cls, len_cls, len_img, scale, renormalize, backend):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=accumulation_dtype(backend, qkv.dtype))


class PackedAttention(torch.autograd.Function):
    """``apply(qkv, prompt_kv, mask, bits, pool_cls, len_cls, len_img, scale, renormalize, backend, deterministic)``
    -> out ``[B, N, H*D]``: the forward kernel, and the backward op writing dq, dk, dv into one ``[B, N, 3, H, D]``
    gradient buffer (qkv and prompt_kv with unit stride on D)."""

    @staticmethod
    def forward(ctx, qkv, prompt_kv, mask, bits, pool_cls, len_cls, len_img, scale, renormalize, backend,
                deterministic):
        heads = (*_split_qkv(qkv), *prompt_kv.unbind(-4))  # q, k, v [B, H, N, D], prompt_k, prompt_v: views
        if traced():
            out, lse = packed_attention_fwd(qkv, prompt_kv, mask, bits, pool_cls, len_cls, len_img, scale,
                                            renormalize, backend)
            out_heads = _heads(out, qkv.shape[3])
        else:  # what the op runs, on the views the backward needs too
            out_heads, lse = implementation(backend).attention_forward(
                *heads, Selection(mask, bits, pool_cls, len_cls, len_img), scale, renormalize)
            out = out_heads.transpose(1, 2).flatten(2)  # [B, N, H*D]: a view of the contiguous [B, N, H, D] buffer
        ctx.save_for_backward(*heads, out_heads, lse, mask, bits)
        ctx.config = ((pool_cls, len_cls, len_img), scale, renormalize, backend, deterministic)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Gradients of qkv (one [B, N, 3, H, D] buffer, written by the backward op) and of prompt_kv."""
        refuse_double_backward("tcpa_packed_attention")
        q, k, v, prompt_k, prompt_v, out, lse, mask, bits = ctx.saved_tensors  # out [B, H, N, D]
        layout, scale, renormalize, backend, deterministic = ctx.config
        B, H, N, D = q.shape
        dqkv = torch.empty((B, N, 3, H, D), dtype=q.dtype, device=q.device)  # dq, dk, dv go in place
        dprompt = attention_grads(*_split_qkv(dqkv), _heads(grad_out, H), q, k, v, prompt_k, prompt_v, out, lse,
                                  Selection(mask, bits, *layout), scale, renormalize, backend, deterministic)
        return dqkv, dprompt, *([None] * 9)  # nothing for the selection, layout and flags


def packed_attention(qkv: Tensor, prompt_kv: Tensor, selection: Selection, scale: float, renormalize: bool,
                     backend: str, deterministic: bool) -> Tensor:
    """:func:`tcpa_packed_attention` without the argument checks, for the model path: returns ``[B, N, H*D]``.

    The caller guarantees what ``tcpa_packed_attention`` checks: qkv ``[B, N, 3, H, D]`` (fp16/bf16/fp32, fp64 on
    the torch backend), prompt_kv ``[2, H, P, D]`` or ``[B, 2, H, P, D]`` on qkv's device in qkv's dtype or fp32,
    ``selection`` a :class:`Selection` for these B, N, P, scale a float > 0, renormalize and deterministic bools,
    backend "triton" or "torch" (resolved) within the Triton limits of ``check_kernel_limits``. Both tensors are
    read in place when D has unit stride (timm's qkv view; prompt K/V as a permuted view of a ``[P, 2, H, D]`` or
    ``[B, P, 2, H, D]`` tensor), else copied once.
    """
    (qkv,), (prompt_kv,) = shared_strides(qkv), shared_strides(prompt_kv)  # unit stride on D, else a copy
    return PackedAttention.apply(qkv, prompt_kv, *selection.op_args(), scale, renormalize, backend, deterministic)


def tcpa_packed_attention(qkv: Tensor, prompt_kv: Tensor, selection: Selection, *, scale: float, renormalize: bool,
                          backend: str, deterministic: bool = True) -> Tensor:
    """Prompt-augmented attention of N query tokens over [P prompts ; N tokens] keys, on timm's qkv layout.

    Args:
        qkv: ``[B, N, 3, H, D]``, the view ``attn.qkv(h).view(B, N, 3, H, D)`` of timm's qkv projection (any
            strides with unit stride on D are read in place); fp16/bf16/fp32, fp64 on the torch backend.
        prompt_kv: prompt keys and values ``[2, H, P, D]`` shared by the batch, or ``[B, 2, H, P, D]``; fp32 or
            qkv's dtype (the Triton kernels cast fp32 prompts to qkv's dtype after loading them: no cast copy).
        selection: which prompts each token may use: selection words (int64 ``[B, N]``, bit e = pool entry e, with
            the pool layout pool_cls/len_cls/len_img) or a bool mask ``[B, N, P]``.
        scale: score scale, a finite number > 0 (``attn.scale``, usually ``D ** -0.5``).
        renormalize: False (the published method): unselected prompts stay in the softmax normaliser but add no
            value. True: ordinary masked softmax.
        backend: "triton" or "torch", already resolved (``tcpa_kernels._backend.resolve_backend``).
        deterministic: shared-prompt gradients by a fixed-order reduction over the batch (True) or fp32 atomics.

    Returns:
        ``[B, N, H*D]`` contiguous, in qkv's dtype: what ``attn.proj`` reads. Differentiable in qkv (its gradient
        is one contiguous ``[B, N, 3, H, D]`` tensor) and prompt_kv (gradient of its shape and dtype).
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
    check_tensor("prompt_kv", prompt_kv, ndim=(4, 5), dtypes=tuple(dict.fromkeys((torch.float32, qkv.dtype))))
    P = prompt_kv.shape[-2]
    lead = (2, H) if prompt_kv.dim() == 4 else (B, 2, H)
    if prompt_kv.device != qkv.device or tuple(prompt_kv.shape) != (*lead, P, D) or P < 1:
        raise ValueError(f"prompt_kv: expected shape {(*lead, 'P >= 1', D)} on {qkv.device} ([2, H, P, D] or "
                         f"[B, 2, H, P, D]), got {describe(prompt_kv)}")
    check_selection(selection, B, N, P, qkv.device)
    check_kernel_limits("qkv", qkv, backend, (B, H, N, P, D), qkv.stride(1))
    return packed_attention(qkv, prompt_kv, selection, scale, renormalize, backend, deterministic)
