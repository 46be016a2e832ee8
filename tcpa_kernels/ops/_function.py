"""Forward/backward plumbing shared by the two autograd Functions (explicit mask and fused top-k)."""

import dataclasses

from tcpa_kernels.ops import _attention_kernels, _torch_attention

_IMPLEMENTATIONS = {"triton": _attention_kernels, "torch": _torch_attention}


def run_forward(ctx, backend, q, k, v, prompt_k, prompt_v, selection, scale, renormalize, deterministic):
    out, lse = _IMPLEMENTATIONS[backend].attention_forward(q, k, v, prompt_k, prompt_v, selection, scale,
                                                           renormalize)
    ctx.selection_field = "mask" if selection.mask is not None else "bits"
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, getattr(selection, ctx.selection_field))
    ctx.selection = dataclasses.replace(selection, mask=None, bits=None)  # layout only; tensor is saved
    ctx.config = (backend, scale, renormalize, deterministic)
    return out


def run_backward(ctx, grad_out):
    """Grads of (q, k, v, prompt_k, prompt_v)."""
    q, k, v, prompt_k, prompt_v, out, lse, sel_tensor = ctx.saved_tensors
    backend, scale, renormalize, deterministic = ctx.config
    selection = dataclasses.replace(ctx.selection, **{ctx.selection_field: sel_tensor})
    return _IMPLEMENTATIONS[backend].attention_backward(
        grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize, deterministic,
        ctx.needs_input_grad[:5],
    )
