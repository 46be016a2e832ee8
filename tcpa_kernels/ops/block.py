"""``block_attention``: the attention half of a pre-norm ViT block as one autograd node (docs/how-it-works.md, 'In a
ViT block').

    x [B, N, C] -> norm1(x), matching, selection, loss terms    (the matching kernel, norm1 fused: ``match_select``)
                -> qkv = norm1(x) W^T + b, [B, N, 3, H, D]       (one GEMM, frozen W and b)
                -> attention over [selected prompts ; tokens]  (the packed kernel reads q, k, v in place: ``packed``)
                -> out [B, N, H*D]
                -> x + out W_proj^T + b_proj, [B, N, C]         (optional: the output projection and the residual)
    and the matching-loss terms [B, N].

The same kernels, GEMMs and saved tensors as the nodes the block would otherwise make (``MatchSelect``, the linear's,
``PackedAttention``, the projection's and the residual's), in one: one Python autograd node each way, which is what
a host-bound step pays per layer. Saved: x, the norm statistics and selection words (the matching's), the weights in
their GEMMs' dtype (the linears'), qkv, out and lse (the attention's). Backward: ``dout = dy W_proj``, the attention
kernel's dqkv and prompt gradients, one GEMM ``dh = dqkv W``, then the matching kernel's dx, to which it adds the
layer norm's gradient of dh and dy through the residual (in the same kernel: no separate add).

Under autocast the GEMMs run as autocast would run the linears: inputs, weights and biases cast to the autocast
dtype (fp64 left alone), the cast weights saved for the backward GEMMs, gradients cast back to their inputs' dtypes.
The norm's and the projections' parameters must be frozen (no gradient is computed for them); the model path checks
it (``timm_vit``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from tcpa_kernels._backend import autocast_off
from tcpa_kernels.ops._function import read_in_place, refuse_double_backward
from tcpa_kernels.ops.match_select import matching_forward, matching_grads
from tcpa_kernels.ops.packed import packed_grads, run_packed_forward

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts (not fp64)
_NO_GRADS = (None,) * 10  # BlockAttention's gradients of the tasks, layouts, norm's and projections' params, settings


def _gemm_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the block's linears run in under autocast (None: autocast is off, or leaves x's dtype alone)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in _AUTOCAST_DTYPES:
        return torch.get_autocast_dtype(device_type)
    return None


def _gemm_operands(dtype: torch.dtype | None, h: Tensor, weight: Tensor,
                   bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(h, weight, bias) in the dtype the linear runs in: ``dtype`` (``_gemm_dtype``), or as they are (None)."""
    if dtype is None:
        return h, weight, bias
    return h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class BlockAttention(torch.autograd.Function):
    """``apply(x, keys_cls, keys_img, prompt_kv, tasks, prompt_tasks, layouts, norm_weight, norm_bias, qkv_weight,
    qkv_bias, proj_weight, proj_bias, settings)`` with ``settings = (norm_eps, num_prefix_tokens, k_cls, k_img,
    num_heads, pool_cls, len_cls, len_img, scale, renormalize, backend, deterministic, prompts_by_task)`` (one
    argument: each
    argument of an autograd function costs host time at every call) -> (out [B, N, H*D], or x + out W_proj^T +
    b_proj [B, N, C] when proj_weight is given; terms [B, N]); differentiable in x, the keys and prompt_kv. With
    tasks (int [B]) the keys are a prompt bank's ([T, pool, C]), sample b matching set tasks[b], and prompt_kv its
    prompt sets ([T', 2, H, P, D]), sample b attending to set prompt_tasks[b] (``prompts_by_task``: set tasks[b],
    prompt_tasks None: one tensor is not passed twice, which dynamo cannot trace; prompt_tasks None otherwise:
    prompt_kv shared or per sample, as without a bank); with layouts (int [B, 6], ``Selection.layouts``) each
    sample's own pools inside the padded ones."""

    @staticmethod
    def forward(ctx, x, keys_cls, keys_img, prompt_kv, tasks, prompt_tasks, layouts, norm_weight, norm_bias,
                qkv_weight, qkv_bias, proj_weight, proj_bias, settings):
        (norm_eps, num_prefix_tokens, k_cls, k_img, num_heads, pool_cls, len_cls, len_img, scale, renormalize, backend,
         _, prompts_by_task) = settings
        B, N, _ = x.shape
        terms, bits, h, mean, rstd = matching_forward(x, keys_cls, keys_img, tasks, layouts, norm_weight, norm_bias,
                                                      norm_eps, True, num_prefix_tokens, k_cls, k_img, backend)
        dtype = _gemm_dtype(h)
        h, weight, bias = _gemm_operands(dtype, h, qkv_weight, qkv_bias)
        with autocast_off(x.device.type):  # qkv [B, N, 3, H, D]
            qkv = F.linear(h, weight, bias).view(B, N, 3, num_heads, weight.shape[0] // (3 * num_heads))
            out, lse = run_packed_forward(qkv, prompt_kv, None, bits, tasks if prompts_by_task else prompt_tasks,
                                          layouts, pool_cls, len_cls, len_img, scale, renormalize, backend)
            result = out
            if proj_weight is not None:  # the output projection and the residual: x + proj(out), [B, N, C]
                out_in, proj_weight, proj_bias = _gemm_operands(dtype, out, proj_weight, proj_bias)
                result = x + F.linear(out_in, proj_weight, proj_bias)
        ctx.save_for_backward(x, keys_cls, keys_img, tasks, prompt_tasks, layouts, bits, norm_weight, mean, rstd,
                              weight, qkv, prompt_kv, out, lse, proj_weight)
        ctx.settings = settings
        ctx.set_materialize_grads(False)  # no zero gradients are built for an unused output
        return result, terms

    @staticmethod
    def backward(ctx, grad_result, grad_terms):
        refuse_double_backward("a prompted block's attention")
        (x, keys_cls, keys_img, tasks, prompt_tasks, layouts, bits, norm_weight, mean, rstd, weight, qkv, prompt_kv,
         out, lse, proj_weight) = ctx.saved_tensors
        (_, num_prefix_tokens, k_cls, k_img, _, pool_cls, len_cls, len_img, scale, renormalize, backend,
         deterministic, prompts_by_task) = ctx.settings
        need_x, need_keys_cls, need_keys_img, need_prompts = ctx.needs_input_grad[:4]
        B, N, C = x.shape
        grad_out = grad_result
        if grad_result is not None and proj_weight is not None:  # through proj, in its GEMM's dtype
            grad_proj = grad_result if grad_result.dtype == proj_weight.dtype else grad_result.to(proj_weight.dtype)
            grad_out = torch.mm(grad_proj.view(B * N, C), proj_weight).view(B, N, proj_weight.shape[1])
        dh = dprompt = None
        if grad_out is not None and (need_x or need_prompts):
            attention_tasks = tasks if prompts_by_task else prompt_tasks
            dqkv, dprompt = packed_grads(grad_out, qkv, prompt_kv, out, lse, None, bits, attention_tasks, layouts,
                                         pool_cls, len_cls, len_img, scale, renormalize, backend, deterministic)
            if need_x:  # dh = dqkv W in the GEMM's dtype, then x's (the norm's output dtype)
                dh = torch.mm(dqkv.view(B * N, weight.shape[0]), weight).view(B, N, C)
                dh = dh if dh.dtype == x.dtype else dh.to(x.dtype)
        dx = dkeys_cls = dkeys_img = None
        residual = grad_result if need_x and proj_weight is not None else None  # the gradient around the attention
        if dh is not None or (grad_terms is not None and (need_x or need_keys_cls or need_keys_img)):
            dx, dkeys_cls, dkeys_img = matching_grads(grad_terms, dh, residual, x, keys_cls, keys_img, tasks, layouts,
                                                      bits, norm_weight, mean, rstd, num_prefix_tokens, k_cls, k_img,
                                                      backend, need_x, need_keys_cls or need_keys_img)
        elif residual is not None:
            dx = residual
        return dx, dkeys_cls, dkeys_img, dprompt if need_prompts else None, *_NO_GRADS


def block_attention(x: Tensor, keys_cls: Tensor, keys_img: Tensor, prompt_kv: Tensor, norm: torch.nn.LayerNorm,
                    qkv: torch.nn.Linear, proj: torch.nn.Linear | None, num_heads: int, num_prefix_tokens: int,
                    k_cls: int, k_img: int, pool_cls: int, len_cls: int, len_img: int, scale: float, renormalize: bool,
                    backend: str, deterministic: bool = True, tasks: Tensor | None = None,
                    prompt_tasks: Tensor | None = None, layouts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, N, H*D], what ``proj`` reads, or with ``proj`` the residual stream after the attention,
    x + proj(out) [B, N, C]; terms [B, N], the layer's matching-loss terms) of a pre-norm block whose input is
    x [B, N, C]. For the model path, unchecked: what ``norm_match`` and ``packed_attention`` take (with tasks and
    prompt_tasks, int [B], a prompt bank's keys [T, pool, C] and prompt_kv [T', 2, H, P, D], and layouts:
    ``BlockAttention``),
    with the pools' keys contiguous,
    ``norm`` a LayerNorm over C, ``qkv`` a linear C -> 3 * H * D and ``proj`` one H * D -> C (or None), all
    frozen."""
    norm_params, qkv_params = norm._parameters, qkv._parameters  # dict reads: ``Module.__getattr__`` costs ~0.7 us
    proj_params = {"weight": None, "bias": None} if proj is None else proj._parameters
    by_task = tasks is not None and prompt_tasks is tasks
    settings = (norm.eps, num_prefix_tokens, k_cls, k_img, num_heads, pool_cls, len_cls, len_img, scale, renormalize,
                backend, deterministic, by_task)
    return BlockAttention.apply(x, keys_cls, keys_img, read_in_place(prompt_kv, -4), tasks,
                                None if by_task else prompt_tasks, layouts,
                                norm_params["weight"], norm_params["bias"], qkv_params["weight"], qkv_params["bias"],
                                proj_params["weight"], proj_params["bias"], settings)
