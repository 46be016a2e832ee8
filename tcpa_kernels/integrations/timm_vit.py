"""timm ``VisionTransformer`` blocks: pre-norm ``Block``, post-norm ``ResPostBlock``, ``ParallelThingsBlock``
(parallel attention branches) and ``ParallelScalingBlock`` (ViT-22B: attention and MLP from one input projection),
and the timm attention modules (``Attention`` here, ``EvaAttention`` / ``AttentionRope`` in ``timm_eva.py``).

``Block`` and ``ParallelScalingBlock`` compute their attention in their own mixin, on the packed projection read in
place (``Block``: ``tcpa_packed_attention`` reads q/k/v from the ``qkv`` output, writes what ``proj`` reads); the other
blocks run their own forward with swapped attention modules (``family.TCPABlockMixin``). Every family with one
attention per block gets its prompt K/V from the model's one batched pass (``_prompt_kv``); ``ParallelThingsBlock``'s
attentions project the prompt tokens themselves.
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from torch import nn

from tcpa_kernels._forward import hand_on, join_forward, layer_call, record_terms
from tcpa_kernels._patch import register_mixin
from tcpa_kernels._prompt_kv import KVProjection, Rows
from tcpa_kernels.integrations.family import (
    ATTENTION_MIXINS,
    BlockFamily,
    TCPABlockMixin,
    VPTMixin,
    block_prompt_kv,
    register_family,
    reject_attn_mask,
    single_site_projection,
    site_prompt_kv,
)
from tcpa_kernels.integrations.models import ModelFamily, register_model
from tcpa_kernels.integrations.prompts import fusable_norm

# ------------------------------------------------------------------------------------------------ attention


def attention_heads(attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None):
    """q, k, v [B, H, S, D] of h [B, S, C] through a timm attention's projections (fused ``qkv`` with its bias or
    EVA's separate q/v biases, or ``q_proj``/``k_proj``/``v_proj`` with grouped K/V heads), ``q_norm``/``k_norm``
    and, when given, the rotary embedding of the tokens after ``attn.num_prefix_tokens``."""
    B, S, _ = h.shape
    H, D = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases, a zero k bias
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = F.linear(h, attn.qkv.weight, bias).reshape(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", H)
        q = attn.q_proj(h).reshape(B, S, H, D).transpose(1, 2)
        k, v = (proj(h).reshape(B, S, kv_heads, D).transpose(1, 2) for proj in (attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = (_rotate(attn, t, rope).type_as(v) for t in (q, k))
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: head h uses K/V head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def _rotate(attn, t, rope):
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, npt:], rope, half=getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :npt], rotated], dim=2)


def _k_norm(module: nn.Module) -> nn.Module | None:
    return None if isinstance(module, nn.Identity) else module


def attention_kv(attn: nn.Module, prompt_norm: nn.Module) -> KVProjection:
    """The prompt K/V projection of a timm attention whose input is ``prompt_norm`` of the block input."""
    norm = None if isinstance(prompt_norm, nn.Identity) else prompt_norm
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is not None:
        rows = slice(attn.num_heads * attn.head_dim, None)  # the K and V rows
        weights = (Rows(attn.qkv, "weight", rows),)
        if getattr(attn, "q_bias", None) is not None:  # EVA: a zero k bias buffer and a v bias
            biases = (Rows(attn, "k_bias"), Rows(attn, "v_bias"))
        else:
            biases = None if attn.qkv.bias is None else (Rows(attn.qkv, "bias", rows),)
    else:
        weights = (Rows(attn.k_proj, "weight"), Rows(attn.v_proj, "weight"))
        biases = None if attn.k_proj.bias is None else (Rows(attn.k_proj, "bias"), Rows(attn.v_proj, "bias"))
    return KVProjection(norm, weights, biases, _k_norm(attn.k_norm), kv_heads, attn.head_dim,
                        getattr(attn, "num_kv_groups", 1))


def attention_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A timm attention after the softmax: out [B, N, H*D] through its norm, gate (from the input h) and proj."""
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def site_attention(attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """TCPA attention of a swapped timm attention module: h [B, N, C] -> [B, N, C_out]."""
    site = attn._tcpa_site
    call = layer_call(site.prompts)
    q, k, v = attention_heads(attn, h, rope)  # [B, H, N, D]
    prompt_kv = site_prompt_kv(call, lambda p: attention_heads(attn, site.prompt_norm(p))[1:])
    out = site.prompts.attend(q, k, v, prompt_kv, call.selection, scale=attn.scale)
    return attention_output(attn, out.transpose(1, 2).flatten(2), h)


@register_mixin
class TCPAAttentionMixin:
    """timm ``Attention`` attending over [selected prompts ; tokens]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        return site_attention(self, x, None)


@register_mixin
class TCPARopeAttentionMixin:
    """timm ``EvaAttention`` / ``AttentionRope`` attending over [selected prompts ; tokens]; prompts get no rotation."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        return site_attention(self, x, rope)


# ---------------------------------------------------------------------------------------------------- blocks


@register_mixin
class TCPAMixin:
    """timm pre-norm ``Block`` with TCPA attention (docs/how-it-works.md, 'In a ViT block'). x [B, N, C] -> [B, N, C].

    One pass of the matching kernel gives the selection and ``norm1(x)``; q, k, v are read in place from the packed
    ``qkv`` output and the attention writes the ``[B, N, C]`` tensor ``proj`` reads."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        parts = self._modules  # dict reads: ``Module.__getattr__`` costs ~0.7 us a name, at every block call
        layer, attn, tcpa, norm1 = self._prompt_layer, parts["attn"], parts["tcpa"], parts["norm1"]
        fwd, record = join_forward(x, layer)
        prompt_kv, _ = block_prompt_kv(self, fwd, layer, x.shape[0])  # [2, H, P, D] or [B, 2, H, P, D]
        bank = fwd.layer_bank(layer.index)  # a prompt bank's forward: prompt_kv [T, 2, H, P, D], a task per sample
        one_node, proj = _block_plan(self)
        if one_node:  # with proj, the node returns x + proj(attention)
            out, terms = tcpa.attend_block(x, norm1, attn._modules["qkv"], attn.num_heads, prompt_kv, attn.scale, proj,
                                           bank)
            x = out if proj is not None else x + self.drop_path1(self.ls1(attention_output(attn, out, None)))
        else:
            selection, terms, h = tcpa.select(x, norm1, bank)  # h: norm1(x) from the kernel when frozen
            h = norm1(x) if h is None else h
            B, N, _ = h.shape
            qkv = attn.qkv(h).view(B, N, 3, attn.num_heads, attn.head_dim)  # [B, N, 3, H, D]
            if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
                # qk_norm: a LayerNorm over D, the same on [B, N, H, D] as on timm's [B, H, N, D]; one restacking copy
                qkv = torch.stack([attn.q_norm(qkv[:, :, 0]).to(qkv.dtype), attn.k_norm(qkv[:, :, 1]).to(qkv.dtype),
                                   qkv[:, :, 2]], dim=2)
            out = tcpa.attend_packed(qkv, prompt_kv, selection, attn.scale)  # [B, N, C]
            x = x + self.drop_path1(self.ls1(attention_output(attn, out, h)))
        record_terms(record, layer.index, terms)
        x = x + parts["drop_path2"](parts["ls2"](parts["mlp"](parts["norm2"](x))))
        return hand_on(x, fwd, record)


def _frozen_linear(module: nn.Module | None) -> bool:
    """A plain ``nn.Linear`` (not an adapter's wrapper or subclass) whose parameters are frozen."""
    if type(module) is not nn.Linear:
        return False
    params = module._parameters
    return not params["weight"].requires_grad and (params["bias"] is None or not params["bias"].requires_grad)


def _passes_through(module: nn.Module | None) -> bool:
    """The module returns its input unchanged: ``nn.Identity``, or dropout that draws nothing (p = 0, or eval)."""
    if isinstance(module, nn.Dropout):
        return module.p == 0 or not module.training
    return isinstance(module, nn.Identity)


def _block_plan(blk) -> tuple[bool, nn.Linear | None]:
    """(whether the block's attention runs as one autograd node, ``TCPAPrompts.attend_block``; the proj that node
    applies with the residual, or None).

    One node: top-k selection, a frozen LayerNorm before the attention, a frozen linear qkv projection, no q/k norm
    and no gate. With proj: a frozen linear proj and nothing else between the attention and the residual add (no
    output norm, proj dropout, layer scale or drop path that does anything). Checked at every call, as a user may
    unfreeze or wrap a layer between steps, through the modules' dicts (``Module.__getattr__`` costs ~0.7 us a
    name, a host cost of every block call)."""
    blocks, attn = blk._modules, blk._modules["attn"]
    parts = attn._modules
    one_node = (blocks["tcpa"].selection_mode == "topk" and _frozen_linear(parts.get("qkv"))
                and isinstance(parts.get("q_norm"), nn.Identity) and isinstance(parts.get("k_norm"), nn.Identity)
                and parts.get("gate", attn.__dict__.get("gate")) is None and fusable_norm(blocks["norm1"]))
    plain = (one_node and _frozen_linear(parts.get("proj")) and isinstance(parts.get("norm"), nn.Identity)
             and _passes_through(parts.get("proj_drop")) and isinstance(blocks.get("ls1"), nn.Identity)
             and isinstance(blocks.get("drop_path1"), nn.Identity))
    return one_node, parts["proj"] if plain else None


@register_mixin
class TCPAParallelScalingMixin:
    """timm ``ParallelScalingBlock``: q, k, v and the MLP input come from one projection of in_norm(x); prompts go
    through the same in_norm and the K/V rows of in_proj. x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        B, N, C = x.shape
        layer = self._prompt_layer
        fwd, record = join_forward(x, layer)
        selection, terms, h = self.tcpa.select(x, self.in_norm, fwd.layer_bank(layer.index))  # bank: as TCPAMixin
        record_terms(record, layer.index, terms)
        prompt_kv, _ = block_prompt_kv(self, fwd, layer, B)
        q, k, v, x_mlp = self._tcpa_heads(self.in_norm(x) if h is None else h)  # [B, H, N, D], [B, N, hidden]
        x_attn = self.tcpa.attend(q, k, v, prompt_kv, selection, scale=self.scale).transpose(1, 2).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return hand_on(x + self.drop_path(self.ls(y)), fwd, record)

    def _tcpa_heads(self, h):
        """h [B, S, C] -> q, k, v [B, H, S, D] (q_norm/k_norm applied) and the MLP input [B, S, hidden]."""
        B, S, _ = h.shape
        x_mlp, q, k, v = torch.split(self.in_proj(h), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q, k, v = (t.reshape(B, S, self.num_heads, self.head_dim) for t in (q, k, v))
        return self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2), x_mlp


def _parallel_scaling_kv(blk) -> KVProjection:
    """ViT-22B's block: the K and V rows of ``in_proj`` (after the MLP and q rows), the q/k/v part of its bias."""
    start = blk.in_split[0] + blk.in_split[1]
    rows = slice(start, start + blk.in_split[2] + blk.in_split[3])
    biases = None if blk.in_proj.bias is None else (Rows(blk.in_proj, "bias", rows),)
    return KVProjection(blk.in_norm, (Rows(blk.in_proj, "weight", rows),), biases, _k_norm(blk.k_norm),
                        blk.num_heads, blk.head_dim)


def timm_model_family(name: str) -> ModelFamily:
    """A timm model (``VisionTransformer``, ``Eva``): ``blocks``, ``num_prefix_tokens``, ``embed_dim``, ``head`` (and
    DeiT's ``head_dist``), ``reset_classifier``, ``patch_embed``."""

    def set_num_classes(model, n):
        model.num_classes = n

    return ModelFamily(name, blocks=lambda m: m.blocks, num_prefix_tokens=lambda m: m.num_prefix_tokens,
                       embed_dim=lambda m: m.embed_dim, patch_area=lambda m: math.prod(m.patch_embed.patch_size),
                       heads=("head", "head_dist"), num_classes=lambda m: m.num_classes,
                       reset_head=lambda m, n: m.reset_classifier(n), set_num_classes=set_num_classes,
                       patch_embedding=lambda m: m.patch_embed)


register_model(VisionTransformer, timm_model_family("timm VisionTransformer"))
ATTENTION_MIXINS[Attention] = TCPAAttentionMixin
register_family(Block, BlockFamily("timm Block (pre-norm)", TCPAMixin, VPTMixin,
                                   kv_projection=lambda blk: attention_kv(blk.attn, blk.norm1),
                                   own_attention=lambda blk: blk.attn, own_attention_types=(Attention,)))
register_family(ResPostBlock, BlockFamily("timm ResPostBlock (post-norm)", TCPABlockMixin, VPTMixin,
                                          lambda blk: [(blk.attn, nn.Identity())],
                                          kv_projection=single_site_projection(attention_kv)))
register_family(ParallelThingsBlock, BlockFamily("timm ParallelThingsBlock (parallel branches)", TCPABlockMixin,
                                                 VPTMixin, lambda blk: [(a.attn, a.norm) for a in blk.attns]))
register_family(ParallelScalingBlock, BlockFamily("timm ParallelScalingBlock (ViT-22B)", TCPAParallelScalingMixin,
                                                  VPTMixin, kv_projection=_parallel_scaling_kv))
