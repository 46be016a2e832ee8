"""Prompt keys/values of every layer of a TCPA model, computed once per forward (TCPA_SPEC.md §3-§4).

A layer's prompt K/V are its prompt tokens (after prompt dropout) through that layer's own ``norm1``, the K/V rows
of its ``qkv`` projection and its ``k_norm``. They depend on parameters only, so block 0 computes them for all
layers at once instead of every block doing a few tiny ops of its own:

- the prompt tokens of all layers: one ``cat``, one dropout draw (one mask for the batch -> ``[L, P, C]``, or one
  per sample -> ``[L, B, P, C]``, ``prompt_dropout_per_sample``) and the prompt transform (VFPT's Fourier prompts);
- when every ``norm1`` is a LayerNorm with the same eps and every layer the same heads (timm's ViTs): one layer
  norm without affine and one batched GEMM, with ``norm1``'s affine folded into the K/V rows of ``W_qkv``
  (``W'_l = W_kv,l * w_l``, ``b'_l = b_kv,l + W_kv,l @ b_l``). The folded weights ``[L, 2C, C]`` of a frozen
  backbone are kept between forwards (about 57 MB in fp32 at ViT-B/16) and rebuilt when a weight changes; a
  trainable ``norm1`` or ``qkv`` gets them rebuilt inside the graph every forward, so its gradients stay exact;
- otherwise one ``norm1`` + linear per layer.

When some block's parameters are FSDP2 shards at block 0 (every block sharded on its own), only a block's own
forward sees its parameters whole: then each block computes its own prompts / K/V (``own_prompts``,
``own_prompt_kv``) and the step functions return None.

Without autograd (eval under ``no_grad``) the K/V themselves are kept until a parameter changes. All of it runs in
the parameters' dtype outside autocast: under autocast a 16-bit copy of ``W_qkv`` would be cast for these GEMMs and
saved for backward; the attention kernels cast the prompt tiles on load instead.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tcpa_kernels._patch import is_shard
from tcpa_kernels.integrations.prompt_tokens import forward_tokens


def _versions(tensors):
    """Storages (replaced by ``.to()``) and versions (bumped by in-place updates: optimizer steps, loads). The
    storage is identified by its implementation's address, which fake tensors have too (their data_ptr is 0)."""
    return tuple((t.untyped_storage()._cdata, t._version) for t in tensors)


def _projection_params(blocks):
    return [p for blk in blocks for module in (blk.norm1, blk.attn.qkv, blk.attn.k_norm) for p in module.parameters()]


def _prompt_parts(blk):
    """The block's prompt tokens: CLS-pool prompts [Pc*Lc, C], then image-pool prompts [Pi*Li, C]."""
    return blk.tcpa.prompts_cls.flatten(0, 1), blk.tcpa.prompts_img.flatten(0, 1)


def _sharded(state):
    """A block or its attention is its own FSDP2 shard group (either way its qkv weight is a shard, a DTensor,
    outside the block's own forward). One look per block: walking every parameter costs ~0.3 ms per forward."""
    return any(is_shard(blk.attn.qkv.weight) for blk in state.blocks)


def step_prompts(state, batch_size):
    """Prompt tokens of every layer for this forward (the dense path): [L, P, C] or [L, B, P, C]; None when
    sharded."""
    return None if _sharded(state) else layer_prompts(state, batch_size)


def layer_prompts(state, batch_size):
    """Prompt tokens of every layer for this forward: [L, P, C], or [L, B, P, C] with a dropout mask per sample."""
    prompts = torch.cat([part for blk in state.blocks for part in _prompt_parts(blk)])  # [L*P, C], one cat
    return forward_tokens(prompts.view(len(state.blocks), state.config.num_prompts, -1), state.config,
                          state.training, batch_size)


def own_prompts(state, blk, batch_size):
    """One block's prompt tokens for this forward: [P, C] or [B, P, C]."""
    return forward_tokens(torch.cat(_prompt_parts(blk)), state.config, state.training, batch_size)


def _batchable(blocks):
    """Every norm1 a LayerNorm with one eps, every attention the same heads: the layers batch into one GEMM."""
    first = blocks[0]
    return all(isinstance(blk.norm1, nn.LayerNorm) and blk.norm1.eps == first.norm1.eps
               and (blk.attn.num_heads, blk.attn.head_dim) == (first.attn.num_heads, first.attn.head_dim)
               for blk in blocks)


def _folded_weights(blocks):
    """norm1's affine folded into the K/V rows of qkv, per layer: W' [L, 2C, C], b' [L, 2C]."""
    weights, biases = [], []
    for blk in blocks:
        qkv, norm = blk.attn.qkv, blk.norm1
        C = qkv.in_features
        weight = qkv.weight[C:]  # [2C, C]: only the K and V rows
        bias = qkv.bias[C:] if qkv.bias is not None else weight.new_zeros(2 * C)
        if norm.bias is not None:
            bias = bias + weight @ norm.bias
        if norm.weight is not None:
            weight = weight * norm.weight
        weights.append(weight)
        biases.append(bias)
    return torch.stack(weights), torch.stack(biases)


def _kv_weights(state):
    """The folded weights, kept between forwards while no weight trains or changes."""
    params = _projection_params(state.blocks)
    if any(p.requires_grad for p in params) or torch.compiler.is_compiling():  # compiled: no storage checks
        return _folded_weights(state.blocks)
    key = _versions(params)
    if state.weights_key != key:
        with torch.no_grad():
            state.weights = _folded_weights(state.blocks)
        state.weights_key = key
    return state.weights


def _k_norm(attn, kv):
    """kv [..., 2, H, P, D] with the block's k_norm applied to the keys (qk_norm models)."""
    if isinstance(attn.k_norm, nn.Identity):
        return kv
    k, v = kv.unbind(-4)
    return torch.stack([attn.k_norm(k), v], dim=-4)


def _heads_kv(kv, num_heads):
    """K/V rows of prompt tokens [..., P, 2C] -> [..., 2, H, P, D] (contiguous)."""
    return kv.unflatten(-1, (2, num_heads, -1)).movedim(-4, -2).contiguous()


def _all_layers_kv(state, batch_size):
    """Prompt K/V per layer (contiguous): [2, H, P, D], or [B, 2, H, P, D] with a dropout mask per sample."""
    blocks = state.blocks
    prompts = layer_prompts(state, batch_size)  # [L, P, C] or [L, B, P, C]
    L, C = prompts.shape[0], prompts.shape[-1]
    with torch.autocast(prompts.device.type, enabled=False):
        if _batchable(blocks):
            weight, bias = _kv_weights(state)  # [L, 2C, C], [L, 2C]
            normed = F.layer_norm(prompts.view(L, -1, C), (C,), eps=blocks[0].norm1.eps)  # [L, (B*)P, C]
            kv = torch.baddbmm(bias[:, None], normed, weight.transpose(1, 2))  # [L, (B*)P, 2C]
            layers = _heads_kv(kv.view(*prompts.shape[:-1], 2 * C), blocks[0].attn.num_heads).unbind(0)
        else:
            layers = [_layer_kv(blk, layer_prompts_) for blk, layer_prompts_ in zip(blocks, prompts.unbind(0))]
        return [_k_norm(blk.attn, kv) for blk, kv in zip(blocks, layers)]


def _layer_kv(blk, prompts):
    """prompts [..., P, C] through the block's norm1 and the K/V rows of its qkv: [..., 2, H, P, D]
    (contiguous)."""
    C = prompts.shape[-1]
    kv = F.linear(blk.norm1(prompts), blk.attn.qkv.weight[C:],
                  None if blk.attn.qkv.bias is None else blk.attn.qkv.bias[C:])  # [..., P, 2C]
    return _heads_kv(kv, blk.attn.num_heads)


def own_prompt_kv(state, blk, batch_size):
    """One block's prompt K/V [2, H, P, D] (or [B, 2, H, P, D]) for this forward, from its own parameters."""
    prompts = own_prompts(state, blk, batch_size)
    with torch.autocast(prompts.device.type, enabled=False):
        return _k_norm(blk.attn, _layer_kv(blk, prompts))


def step_prompt_kv(state, batch_size):
    """Prompt K/V [2, H, P, D] (or [B, 2, H, P, D] with a dropout mask per sample) of every layer for this
    forward, reused without autograd until a parameter changes; None when sharded."""
    if _sharded(state):
        return None
    prompt_params = [p for blk in state.blocks for p in (blk.tcpa.prompts_cls, blk.tcpa.prompts_img)]
    needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in prompt_params)
    if state.training or needs_graph or torch.compiler.is_compiling():
        return _all_layers_kv(state, batch_size)
    key = _versions(_projection_params(state.blocks) + prompt_params)
    if state.kv_key != key:
        state.kv = _all_layers_kv(state, batch_size)
        state.kv_key = key
    return state.kv
