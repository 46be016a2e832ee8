"""timm ``VisionTransformer`` blocks: pre-norm ``Block`` (the lean path), post-norm ``ResPostBlock``,
``ParallelThingsBlock`` (parallel attention branches) and ``ParallelScalingBlock`` (ViT-22B: attention and MLP
from one input projection).

``Block`` has the lean path the performance contract (TCPA_SPEC.md §6) is measured on: its frozen ``norm1`` is
fused into the matching kernel, q/k/v are read in place from the packed qkv projection, and the prompt K/V of every
layer come from one batched GEMM per forward (``_prompt_kv``). The other blocks run their own forward around the
fused attention op (``family.TCPABlockMixin``), with each layer's prompt K/V projected by its own modules.
"""

import math

import torch
from timm.layers import Attention
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from torch import nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._patch import register_mixin
from tcpa_kernels._prompt_kv import own_prompt_kv, own_prompts, step_prompt_kv, step_prompts
from tcpa_kernels.integrations.family import (
    ATTENTION_MIXINS,
    BlockFamily,
    TCPAAttentionMixin,
    TCPABlockMixin,
    VPTMixin,
    attention_heads,
    attention_output,
    register_family,
    reject_attn_mask,
)
from tcpa_kernels.integrations.models import ModelFamily, register_model
from tcpa_kernels.ops._function import topk_bits_op
from tcpa_kernels.ops.match_prompts import match_scores, matching_loss
from tcpa_kernels.ops.packed import tcpa_packed_attention


def _fused_attention(blk, h, selection, prompt_kv, cfg):
    """TCPA attention through the fused op, on the packed qkv projection. h [B, N, C], prompt_kv [2, H, P, D] (or
    [B, 2, H, P, D]) -> [B, N, C]: no layout copy on either side of the op."""
    attn = blk.attn
    B, N, _ = h.shape
    qkv = attn.qkv(h).view(B, N, 3, attn.num_heads, attn.head_dim)  # [B, N, 3, H, D]
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        # qk_norm: a LayerNorm over D, the same on [B, N, H, D] as on timm's [B, H, N, D]; one restacking copy
        qkv = torch.stack([attn.q_norm(qkv[:, :, 0]).to(qkv.dtype), attn.k_norm(qkv[:, :, 1]).to(qkv.dtype),
                           qkv[:, :, 2]], dim=2)
    return tcpa_packed_attention(qkv, prompt_kv, selection, scale=attn.scale, renormalize=cfg.renormalize,
                                 backend=resolve_backend(cfg.backend, h.device))


def _dense_attention(blk, h, selection, prompts, cfg):
    """Official-style TCPA, the baseline the fused op is measured against: prompts ([P, C] or [B, P, C])
    concatenated into the sequence, eager softmax over [P+N] x [P+N], a dense float mask [B, H, P+N, P+N] multiplied
    after it (or -inf before it when renormalize). Returns the output of the N real tokens [B, N, C]."""
    B, N, _ = h.shape
    P = prompts.shape[-2]
    seq = torch.cat([blk.norm1(prompts).expand(B, -1, -1).to(h.dtype), h], dim=1)  # [B, P+N, C]
    q, k, v = attention_heads(blk.attn, seq)  # [B, H, P+N, D]
    scores_qk = (q * blk.attn.scale) @ k.transpose(-1, -2)  # [B, H, P+N, P+N]
    dense_mask = torch.ones(B, blk.attn.num_heads, P + N, P + N, dtype=scores_qk.dtype, device=h.device)
    dense_mask[:, :, P:, :P] = selection.rows(0, N, P)[:, None].to(dense_mask.dtype)
    if cfg.renormalize:
        probs = scores_qk.masked_fill(dense_mask == 0, float("-inf")).softmax(-1)
    else:
        probs = scores_qk.softmax(-1) * dense_mask
    return (probs @ v)[:, :, P:].transpose(1, 2).reshape(B, N, -1)


def _norm_and_select(blk, x, cfg):
    """(norm1(x) [B, N, C], Selection) of the block input x; the matching-loss terms stay in ``blk.tcpa``."""
    prompts = blk.tcpa
    if cfg.attention == "dense" and prompts.selection_mode == "topk":
        # the published code's matching: a scores tensor, its top-k, the loss from it
        n_pre = prompts.num_prefix_tokens
        scores = match_scores(x, prompts.keys_cls, prompts.keys_img)  # [B, N, Pc+Pi]
        bits = topk_bits_op(scores.detach(), n_pre, cfg.pool_size_cls, cfg.topk_cls, cfg.topk_img,
                            resolve_backend(cfg.backend, x.device))
        prompts.matching_terms = matching_loss(scores, bits, n_pre, cfg.topk_cls, cfg.topk_img)[None]
        return blk.norm1(x), prompts.selection(bits)
    selection, h = prompts.select(x, blk.norm1)  # a frozen LayerNorm norm1 rides on the matching kernel
    return (blk.norm1(x) if h is None else h), selection


@register_mixin
class TCPAMixin:
    """timm pre-norm ``Block`` with TCPA attention, the lean path (TCPA_SPEC.md §4). x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        layer = self._prompt_layer
        state, cfg = layer.state, layer.state.config
        if layer.index == 0:  # parameter-only work of every layer, once per forward (None: each layer its own)
            step = step_prompt_kv if cfg.attention == "fused" else step_prompts
            state.step_inputs = step(state, x.shape[0])
        if state.step_inputs is not None:
            prompt_input = state.step_inputs[layer.index]
        else:
            prompt_input = (own_prompt_kv if cfg.attention == "fused" else own_prompts)(state, self, x.shape[0])
        h, selection = _norm_and_select(self, x, cfg)
        attention = _fused_attention if cfg.attention == "fused" else _dense_attention
        out = attention(self, h, selection, prompt_input, cfg)  # [B, N, C]
        x = x + self.drop_path1(self.ls1(attention_output(self.attn, out, h)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register_mixin
class TCPAParallelScalingMixin:
    """timm ``ParallelScalingBlock``: q, k, v and the MLP input come from one projection of in_norm(x); prompts go
    through the same in_norm and the K/V columns of in_proj. x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        B, N, C = x.shape
        h = self.tcpa.begin(x, self.in_norm)  # in_norm(x) from the matching kernel when it is a frozen LayerNorm
        q, k, v, x_mlp = self._tcpa_heads(self.in_norm(x) if h is None else h)  # [B, H, N, D], [B, N, hidden]
        out = self.tcpa.attend(q, k, v, lambda p: self._tcpa_heads(self.in_norm(p))[1:3], scale=self.scale)
        x_attn = out.transpose(1, 2).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))

    def _tcpa_heads(self, h):
        """h [B, S, C] -> q, k, v [B, H, S, D] (q_norm/k_norm applied) and the MLP input [B, S, hidden]."""
        B, S, _ = h.shape
        x_mlp, q, k, v = torch.split(self.in_proj(h), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q, k, v = (t.reshape(B, S, self.num_heads, self.head_dim) for t in (q, k, v))
        return self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2), x_mlp


def timm_model_family(name: str) -> ModelFamily:
    """A timm model (``VisionTransformer``, ``Eva``): ``blocks``, ``num_prefix_tokens``, ``embed_dim``, ``head`` (and
    DeiT's ``head_dist``), ``reset_classifier``."""

    def set_num_classes(model, n):
        model.num_classes = n

    return ModelFamily(name, blocks=lambda m: m.blocks, num_prefix_tokens=lambda m: m.num_prefix_tokens,
                       embed_dim=lambda m: m.embed_dim, patch_area=lambda m: math.prod(m.patch_embed.patch_size),
                       heads=("head", "head_dist"), num_classes=lambda m: m.num_classes,
                       reset_head=lambda m, n: m.reset_classifier(n), set_num_classes=set_num_classes)


register_model(VisionTransformer, timm_model_family("timm VisionTransformer"))
ATTENTION_MIXINS[Attention] = TCPAAttentionMixin
register_family(Block, BlockFamily("timm Block (pre-norm)", TCPAMixin, VPTMixin, own_attention=lambda blk: blk.attn,
                                   own_attention_types=(Attention,), dense=True))
register_family(ResPostBlock, BlockFamily("timm ResPostBlock (post-norm)", TCPABlockMixin, VPTMixin,
                                          lambda blk: [(blk.attn, nn.Identity())]))
register_family(ParallelThingsBlock, BlockFamily("timm ParallelThingsBlock (parallel branches)", TCPABlockMixin,
                                                 VPTMixin, lambda blk: [(a.attn, a.norm) for a in blk.attns]))
register_family(ParallelScalingBlock, BlockFamily("timm ParallelScalingBlock (ViT-22B)", TCPAParallelScalingMixin,
                                                  VPTMixin))
