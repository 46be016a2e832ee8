"""open_clip vision towers: ``open_clip.transformer.VisionTransformer`` (``ResidualAttentionBlock`` with
``nn.MultiheadAttention``, or ``CustomResidualAttentionBlock`` with open_clip's ``Attention``), ``TimmModel``
(a timm ViT / EVA trunk) and the ``CLIP`` / ``CustomTextCLIP`` models that hold them as ``visual``.

Given a whole CLIP model, ``apply_tcpa`` / ``apply_vpt`` prompt the blocks of its vision tower and freeze everything
else (the text tower, the projections, ``logit_scale``). A ``TimmModel`` tower is prompted through the timm
families of its trunk. The class token is the native tower's only prefix token (whatever its pooling: class token,
average or attentional pooler). open_clip has no classifier (``visual.proj`` projects into the joint embedding
space): ``num_classes`` is refused.

Prompts are prefix tokens without position: they go through the block's ``ln_1`` and the K/V rows of the packed
``in_proj_weight`` (and ``ln_k`` under ``qk_norm``). Refused: sequence-first (``batch_first=False``) or cross-attention
blocks, which open_clip's vision tower does not build, and scaled cosine attention, which open_clip's own
``Attention`` cannot run (it calls ``torch.bmm`` on 4-D tensors).
"""

import math

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import nn

from tcpa_kernels._forward import layer_call
from tcpa_kernels._patch import register_mixin
from tcpa_kernels._prompt_kv import KVProjection, Rows
from tcpa_kernels.integrations.family import (
    ATTENTION_MIXINS,
    BlockFamily,
    TCPABlockMixin,
    VPTMixin,
    register_family,
    reject_attn_mask,
    single_site_projection,
    site_prompt_kv,
)
from tcpa_kernels.integrations.models import ModelFamily, model_family, register_model

CLIP_MODELS = (CLIP, CustomTextCLIP)

# ------------------------------------------------------------------------------------------------ attention


def _packed_heads(attn: nn.Module, h: torch.Tensor):
    """q, k, v [B, H, S, D] of h [B, S, C] through a packed ``in_proj_weight`` [3C, C] (q, k, v rows in order)."""
    B, S, _ = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, S, 3C]
    return qkv.view(B, S, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _attention_heads(attn: Attention, h: torch.Tensor):
    """open_clip ``Attention``: q, k, v [B, H, S, D] of h [B, S, C] with its ``ln_q`` / ``ln_k`` (qk_norm)."""
    q, k, v = _packed_heads(attn, h)
    return attn.ln_q(q), attn.ln_k(k), v


def packed_kv(attn: nn.Module, prompt_norm: nn.Module) -> KVProjection:
    """The prompt K/V projection of a packed ``in_proj_weight`` (``nn.MultiheadAttention``, open_clip's
    ``Attention`` with its ``ln_k`` under qk_norm): its K and V rows after the block's ``ln_1``."""
    rows = slice(attn.in_proj_weight.shape[1], None)  # the K and V rows of [3C, C]
    biases = None if attn.in_proj_bias is None else (Rows(attn, "in_proj_bias", rows),)
    k_norm = getattr(attn, "ln_k", None)
    return KVProjection(prompt_norm, (Rows(attn, "in_proj_weight", rows),), biases,
                        None if k_norm is None or isinstance(k_norm, nn.Identity) else k_norm, attn.num_heads,
                        attn.head_dim)


@register_mixin
class TCPAMultiheadAttentionMixin:
    """``nn.MultiheadAttention`` (batch-first self-attention, as open_clip's ``ResidualAttentionBlock`` calls it)
    attending over [selected prompts ; tokens]. query [B, N, C] -> ([B, N, C], None)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        if key is not query or value is not query:
            raise ValueError("key/value: a prompted nn.MultiheadAttention does self-attention only, expected key and "
                             "value to be the query tensor, got other tensors")
        if key_padding_mask is not None or need_weights:
            raise ValueError(f"key_padding_mask/need_weights: a prompted nn.MultiheadAttention takes no padding mask "
                             f"and returns no weights, expected None/False, got key_padding_mask="
                             f"{None if key_padding_mask is None else tuple(key_padding_mask.shape)}, "
                             f"need_weights={need_weights}")
        site = self._tcpa_site
        call = layer_call(site.prompts)
        q, k, v = _packed_heads(self, query)  # [B, H, N, D]
        prompt_kv = site_prompt_kv(call, lambda p: _packed_heads(self, site.prompt_norm(p))[1:])
        out = site.prompts.attend(q, k, v, prompt_kv, call.selection, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None


@register_mixin
class TCPAOpenClipAttentionMixin:
    """open_clip ``Attention`` (``CustomResidualAttentionBlock``: qk_norm, per-head scale, inner norm) attending over
    [selected prompts ; tokens]. x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None):
        reject_attn_mask(attn_mask, False)
        site = self._tcpa_site
        call = layer_call(site.prompts)
        q, k, v = _attention_heads(self, x)  # [B, H, N, D]
        prompt_kv = site_prompt_kv(call, lambda p: _attention_heads(self, site.prompt_norm(p))[1:])
        out = site.prompts.attend(q, k, v, prompt_kv, call.selection, scale=self.scale)
        if self.head_scale is not None:  # [H, 1, 1]
            out = out * self.head_scale
        return self.out_drop(self.out_proj(self.ln_inner(out.transpose(1, 2).flatten(2))))


# ---------------------------------------------------------------------------------------------------- models


def _native_blocks(tower: VisionTransformer, where: str) -> nn.ModuleList:
    """The tower's blocks, after checking that each one is a layout the TCPA attentions above implement."""
    blocks = tower.transformer.resblocks
    for i, blk in enumerate(blocks):
        attn, name = blk.attn, f"{where}.transformer.resblocks[{i}].attn"
        if isinstance(attn, nn.MultiheadAttention):
            if not attn.batch_first:
                raise TypeError(f"{name}: expected batch_first=True (tokens [B, N, C]), got batch_first=False")
            if hasattr(blk, "ln_1_kv") or not attn._qkv_same_embed_dim or attn.bias_k is not None \
                    or attn.add_zero_attn:
                raise TypeError(f"{name}: expected plain self-attention (no cross-attention, kdim/vdim, add_bias_kv "
                                f"or add_zero_attn), got {attn}")
        elif isinstance(attn, Attention) and attn.logit_scale is not None:
            raise TypeError(f"{name}: expected dot-product attention, got scaled cosine attention "
                            "(scaled_cosine_attn=True, which open_clip's own Attention cannot run)")
    return blocks


def _tower(model: nn.Module) -> tuple[nn.Module, ModelFamily | None, str]:
    """(open_clip tower, None, its path) or (timm trunk, its family, its path) of a CLIP model or a tower."""
    where = "model"
    if isinstance(model, CLIP_MODELS):
        model, where = model.visual, "model.visual"
    if isinstance(model, VisionTransformer):
        return model, None, where
    if isinstance(model, TimmModel):
        family = model_family(model.trunk)
        if family is None:
            raise TypeError(f"{where}.trunk: expected a timm VisionTransformer or Eva, got "
                            f"{type(model.trunk).__module__}.{type(model.trunk).__name__}")
        return model.trunk, family, f"{where}.trunk"
    raise TypeError(f"{where}: expected an open_clip VisionTransformer or a TimmModel with a timm ViT trunk, got "
                    f"{type(model).__module__}.{type(model).__name__}")


def _blocks(model: nn.Module) -> nn.ModuleList:
    tower, family, where = _tower(model)
    return _native_blocks(tower, where) if family is None else family.blocks(tower)


def _delegate(native, attribute: str):
    """A ModelFamily question answered by ``native(tower)`` for open_clip's tower, by the trunk's family else."""

    def answer(model):
        tower, family, _ = _tower(model)
        return native(tower) if family is None else getattr(family, attribute)(tower)

    return answer


def _reject_num_classes(model: nn.Module, num_classes: int) -> None:
    raise ValueError(f"num_classes: open_clip {type(model).__name__} has no classification head to replace (its "
                     f"image features are projected into the joint image-text space); expected None, got "
                     f"{num_classes}")


OPEN_CLIP_MODELS = ModelFamily(
    "open_clip vision tower", blocks=_blocks,
    num_prefix_tokens=_delegate(lambda tower: 1, "num_prefix_tokens"),  # the class token
    embed_dim=_delegate(lambda tower: tower.transformer.width, "embed_dim"),
    patch_area=_delegate(lambda tower: math.prod(tower.patch_size), "patch_area"),
    heads=(), num_classes=lambda model: 0, reset_head=_reject_num_classes, set_num_classes=lambda model, n: None,
    patch_embedding=_delegate(lambda tower: tower.conv1, "patch_embedding"))

for model_class in (*CLIP_MODELS, VisionTransformer, TimmModel):
    register_model(model_class, OPEN_CLIP_MODELS)
ATTENTION_MIXINS[nn.MultiheadAttention] = TCPAMultiheadAttentionMixin
ATTENTION_MIXINS[Attention] = TCPAOpenClipAttentionMixin
register_family(ResidualAttentionBlock, BlockFamily("open_clip ResidualAttentionBlock", TCPABlockMixin, VPTMixin,
                                                    lambda blk: [(blk.attn, blk.ln_1)],
                                                    kv_projection=single_site_projection(packed_kv)))
register_family(CustomResidualAttentionBlock, BlockFamily("open_clip CustomResidualAttentionBlock", TCPABlockMixin,
                                                          VPTMixin, lambda blk: [(blk.attn, blk.ln_1)],
                                                          kv_projection=single_site_projection(packed_kv)))
