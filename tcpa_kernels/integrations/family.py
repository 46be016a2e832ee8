"""What a block family tells ``apply_tcpa`` / ``apply_vpt``, and the block and attention mixins shared by families.

A family is a block class (timm ``Block``, ``ResPostBlock``, ``EvaBlock`` ...) with:

- ``tcpa``: the mixin its blocks get under TCPA. Most families use :class:`TCPABlockMixin`: the block's own forward
  runs unchanged after ``TCPAPrompts.begin(x, norm)`` has selected the prompts for its input (and computed its
  pre-attention LayerNorm, see ``attach_sites``), and each of its attention modules (``sites``) is swapped to a TCPA
  attention that attends over [selected prompts ; tokens]. Families whose
  attention is not a module of its own (timm ``ParallelScalingBlock``) or that have a leaner path (timm ``Block``)
  bring their own block mixin.
- ``sites(block)``: the (attention module, pre-attention transform of its input) pairs of a block; prompts go
  through the transform, then the attention's own K/V projection (prompts as prefix tokens, without position).
- ``vpt``: the mixin its blocks get under VPT (the prompts join the sequence, the block's own forward runs).
- ``own_attention(block)``: for a family whose block mixin computes the attention itself from the attention
  module's parts (timm ``Block``'s lean path), that module: it must be exactly a class of ``own_attention_types``
  (a subclass or another attention, e.g. differential attention, may compute something else).
- ``dense``: whether the published dense-mask baseline (``attention="dense"``) is implemented for it.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tcpa_kernels._patch import original_class, prompted_class, register_mixin
from tcpa_kernels.integrations.prompt_tokens import drop_prompts, transform_prompts
from tcpa_kernels.integrations.prompts import TCPAPrompts, fusable_norm


@dataclasses.dataclass(frozen=True)
class BlockFamily:
    name: str
    tcpa: type
    vpt: type
    sites: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] = lambda blk: []
    own_attention: Callable[[nn.Module], nn.Module | None] = lambda blk: None
    own_attention_types: tuple[type, ...] = ()
    dense: bool = False


FAMILIES: dict[type, BlockFamily] = {}
ATTENTION_MIXINS: dict[type, type] = {}  # attention class -> its TCPA attention mixin


def register_family(block_class: type, family: BlockFamily) -> None:
    FAMILIES[block_class] = family


def family_of(blk: nn.Module) -> BlockFamily | None:
    """The family of a block of exactly a registered class (a subclass may change the forward: not assumed)."""
    return FAMILIES.get(type(blk))


def unsupported_attentions(blk: nn.Module) -> list[nn.Module]:
    """The block's attention modules that neither a TCPA attention mixin nor the block's own mixin covers."""
    family = family_of(blk)
    unsupported = [attn for attn, _ in family.sites(blk) if type(attn) not in ATTENTION_MIXINS]
    own = family.own_attention(blk)
    if own is not None and type(own) not in family.own_attention_types:
        unsupported.append(own)
    return unsupported


@dataclasses.dataclass
class Site:
    """An attention module's link to its block's prompts (kept in the attention's ``__dict__``, not a submodule)."""

    prompts: TCPAPrompts
    prompt_norm: nn.Module  # prompt tokens [1, P, C] -> the attention's input


def attach_sites(blk: nn.Module, family: BlockFamily) -> None:
    """Link each attention module of the block to ``blk.tcpa`` and swap it to its TCPA attention class.

    A block with one attention whose input is a frozen LayerNorm of the block input (pre-norm) gets that norm
    fused into the matching kernel: the norm becomes a :class:`FusedNormMixin` and ``blk._tcpa_norm`` names it."""
    sites = family.sites(blk)
    for attn, prompt_norm in sites:
        attn.__dict__["_tcpa_site"] = Site(blk.tcpa, prompt_norm)
        attn.__class__ = prompted_class(ATTENTION_MIXINS[type(attn)], type(attn))
    norm = sites[0][1] if len(sites) == 1 and fusable_norm(sites[0][1]) else None
    blk.__dict__["_tcpa_norm"] = norm
    if norm is not None:
        norm.__dict__["_tcpa_held"] = None
        norm.__class__ = prompted_class(FusedNormMixin, type(norm))


def detach_sites(blk: nn.Module) -> None:
    """Undo ``attach_sites`` on every module of the block (also a partial attach)."""
    blk.__dict__.pop("_tcpa_norm", None)
    for module in blk.modules():
        if module is not blk and "_prompted_base" in type(module).__dict__:
            module.__dict__.pop("_tcpa_site", None)
            module.__dict__.pop("_tcpa_held", None)
            module.__class__ = original_class(module)


def reject_attn_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal: prompted blocks do not take an attention mask, got "
                         f"attn_mask={None if attn_mask is None else tuple(attn_mask.shape)}, is_causal={is_causal}")


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


def attention_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A timm attention after the softmax: out [B, N, H*D] through its norm, gate (from the input h) and proj."""
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def site_attention(attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """TCPA attention of a swapped attention module: h [B, N, C] -> [B, N, C_out]."""
    site = attn._tcpa_site
    q, k, v = attention_heads(attn, h, rope)  # [B, H, N, D]
    out = site.prompts.attend(q, k, v, lambda p: attention_heads(attn, site.prompt_norm(p))[1:], scale=attn.scale)
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
class FusedNormMixin:
    """A block's frozen pre-attention LayerNorm whose output for this forward's block input the matching kernel has
    computed (``TCPAPrompts.begin(x, norm)``, held in ``_tcpa_held``): called on that very tensor it returns that
    output (once), on anything else (prompt tokens) it normalises as usual."""

    def forward(self, input):
        held, self._tcpa_held = self._tcpa_held, None
        if held is not None and held[0] is input:
            return held[1]
        return super().forward(input)


@register_mixin
class TCPABlockMixin:
    """A block whose own forward runs: its input selects the prompts, its swapped attention modules use them."""

    def forward(self, x, *args, **kwargs):
        reject_attn_mask(kwargs.get("attn_mask"), kwargs.get("is_causal", False))
        h = self.tcpa.begin(x, self._tcpa_norm)  # [B, N, C] the pre-attention norm of x, or None
        if h is None:
            return super().forward(x, *args, **kwargs)
        self._tcpa_norm._tcpa_held = (x, h)
        out = super().forward(x, *args, **kwargs)
        self._tcpa_norm._tcpa_held = None  # already so when the block called its norm on x
        return out


@register_mixin
class VPTMixin:
    """VPT: prompts are ordinary tokens (queries too) for the block's own forward. x [B, N, C] -> [B, N, C].

    The prompts go after the N real tokens (attention has no positions, so this is the published model) and the
    block returns the real tokens only: features taken between blocks (``forward_intermediates``) hold no prompts.
    Deep blocks bring their own prompts (dropped out per sample, then VFPT's Fourier transform when configured);
    without deep prompts the prompt tokens' output passes to the next block
    through ``prompt_state.carry`` (per layer, so a checkpointed block recomputes with the prompts it had).
    """

    def forward(self, x, *args, **kwargs):
        reject_attn_mask(kwargs.get("attn_mask"), kwargs.get("is_causal", False))
        layer = self._prompt_layer
        state, cfg = layer.state, layer.state.config
        N = x.shape[1]
        if "vpt_prompts" in self._parameters:
            prompts = drop_prompts(self.vpt_prompts.to(x.dtype), cfg.prompt_dropout, state.training, x.shape[0])
            prompts = transform_prompts(prompts, cfg.prompt_transform, cfg.fourier_fraction)  # [B, P, C]
        else:
            prompts = state.carry[layer.index - 1]
        x = super().forward(torch.cat([x, prompts], dim=1), *args, **kwargs)  # [B, N+P, C], the block's own forward
        if not (cfg.deep or layer.is_last):
            state.carry[layer.index] = x[:, N:]
        return x[:, :N]
