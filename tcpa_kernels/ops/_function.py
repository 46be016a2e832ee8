"""Plumbing shared by the two autograd Functions (explicit mask and fused top-k).

The backend implementations sit behind ``torch.library`` custom ops so ``torch.compile`` treats each
kernel launch as one opaque node (no graph break, no tracing into Triton or the interpreter).
"""

import torch
from torch import Tensor

from tcpa_kernels.ops import _attention_kernels, _torch_attention
from tcpa_kernels.ops.selection import Selection, topk_bits

_IMPLEMENTATIONS = {"triton": _attention_kernels, "torch": _torch_attention}


def _selection(sel: Tensor, pool_cls: int, len_cls: int, len_img: int) -> Selection:
    if sel.dtype == torch.bool:
        return Selection(mask=sel)
    return Selection(bits=sel, pool_cls=pool_cls, len_cls=len_cls, len_img=len_img)


@torch.library.custom_op("tcpa_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor, sel: Tensor, pool_cls: int,
                  len_cls: int, len_img: int, scale: float, renormalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(out [B,H,N,D], lse [B,H,N]); sel is a bool mask [B,N,P] or int64 selection words [B,N]."""
    return _IMPLEMENTATIONS[backend].attention_forward(q, k, v, prompt_k, prompt_v,
                                                       _selection(sel, pool_cls, len_cls, len_img), scale, renormalize)


@attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, sel, pool_cls, len_cls, len_img, scale, renormalize, backend):
    lse_dtype = torch.float64 if (backend == "torch" and q.dtype == torch.float64) else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("tcpa_kernels::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor, out: Tensor,
                  lse: Tensor, sel: Tensor, pool_cls: int, len_cls: int, len_img: int, scale: float,
                  renormalize: bool, backend: str, deterministic: bool, needs_grad: list[bool]) -> list[Tensor]:
    """Grads of (q, k, v, prompt_k, prompt_v); an empty tensor where needs_grad is False."""
    grads = _IMPLEMENTATIONS[backend].attention_backward(
        grad_out, q, k, v, prompt_k, prompt_v, out, lse, _selection(sel, pool_cls, len_cls, len_img), scale,
        renormalize, deterministic, needs_grad)
    return [q.new_empty(0) if g is None else g for g in grads]


@attention_bwd.register_fake
def _(grad_out, q, k, v, prompt_k, prompt_v, out, lse, sel, pool_cls, len_cls, len_img, scale, renormalize, backend,
      deterministic, needs_grad):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need else q.new_empty(0)
            for t, need in zip((q, k, v, prompt_k, prompt_v), needs_grad)]


@torch.library.custom_op("tcpa_kernels::topk_bits", mutates_args=())
def topk_bits_op(scores: Tensor, num_prefix_tokens: int, pool_cls: int, k_cls: int, k_img: int,
                 backend: str) -> Tensor:
    return topk_bits(scores, num_prefix_tokens=num_prefix_tokens, pool_cls=pool_cls, k_cls=k_cls, k_img=k_img,
                     backend=backend)


@topk_bits_op.register_fake
def _(scores, num_prefix_tokens, pool_cls, k_cls, k_img, backend):
    return scores.new_empty(scores.shape[:2], dtype=torch.int64)


def run_forward(ctx, backend, q, k, v, prompt_k, prompt_v, selection, scale, renormalize, deterministic):
    sel = selection.mask if selection.mask is not None else selection.bits
    layout = (selection.pool_cls, selection.len_cls, selection.len_img)
    out, lse = attention_fwd(q, k, v, prompt_k, prompt_v, sel, *layout, scale, renormalize, backend)
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, sel)
    ctx.config = (*layout, scale, renormalize, backend, deterministic)
    return out


def run_backward(ctx, grad_out):
    """Grads of (q, k, v, prompt_k, prompt_v); None for inputs that need none."""
    needs_grad = list(ctx.needs_input_grad[:5])
    grads = attention_bwd(grad_out, *ctx.saved_tensors, *ctx.config, needs_grad)
    return [g if need else None for g, need in zip(grads, needs_grad)]
