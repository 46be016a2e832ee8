"""What a block family tells ``apply_tcpa`` / ``apply_vpt``, and the block and attention mixins shared by families.

A family is a block class (timm ``Block``, ``ResPostBlock``, ``EvaBlock``, a transformers layer ...) with:

- ``tcpa``: the mixin its blocks get under TCPA. Most families use :class:`TCPABlockMixin`: the block's own forward
  runs unchanged inside a layer call (``_forward.LayerCall``) that holds what the layer computed for its input (the
  selection, from ``TCPAPrompts.select``; the pre-attention LayerNorm of the input, computed by the matching kernel;
  the prompt K/V), and each of its attention modules (``sites``) is swapped to a TCPA attention that reads it and
  attends over [selected prompts ; tokens] through ``TCPAPrompts.attend``. Families whose attention is not a module
  of its own (timm ``ParallelScalingBlock``) or that read the packed projection in place (timm ``Block``) bring their
  own block mixin, around the same ``TCPAPrompts`` calls.
- ``sites(block)``: the (attention module, pre-attention transform of its input) pairs of a block; prompts go
  through the transform, then the attention's own K/V projection (prompts as prefix tokens, without position).
- ``kv_projection(block)``: the block's prompt K/V projection (``_prompt_kv.KVProjection``: pre-attention norm, where
  its K/V rows are, k norm, heads; made once when the model is patched), so the model computes every layer's prompt
  K/V in one batched pass; None for a block whose attentions project prompts themselves (several per block).
- ``vpt``: the mixin its blocks get under VPT (the prompts join the sequence, the block's own forward runs).
- ``own_attention(block)``: for a family whose block mixin computes the attention itself from the attention
  module's parts (timm ``Block``), that module: it must be exactly a class of ``own_attention_types`` (a subclass or
  another attention, e.g. differential attention, may compute something else).

Every prompted block joins the forward its input belongs to (``_forward.join_forward``) and hands it on with its
output; nothing of a forward is kept on a module.
"""

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from tcpa_kernels._forward import (
    LayerCall,
    carried_prompts,
    carry_on,
    current_norm_output,
    enter_layer,
    hand_on,
    join_forward,
    leave_layer,
    record_terms,
)
from tcpa_kernels._patch import original_class, prompted_class, register_mixin
from tcpa_kernels._prompt_kv import KVProjection, layer_kv
from tcpa_kernels.integrations.prompt_tokens import drop_prompts, transform_prompts
from tcpa_kernels.integrations.prompts import TCPAPrompts, fusable_norm


@dataclasses.dataclass(frozen=True)
class BlockFamily:
    name: str
    tcpa: type
    vpt: type
    sites: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] = lambda blk: []
    kv_projection: Callable[[nn.Module], KVProjection | None] = lambda blk: None
    own_attention: Callable[[nn.Module], nn.Module | None] = lambda blk: None
    own_attention_types: tuple[type, ...] = ()


FAMILIES: dict[type, BlockFamily] = {}
ATTENTION_MIXINS: dict[type, type] = {}  # attention class -> its TCPA attention mixin


def register_family(block_class: type, family: BlockFamily) -> None:
    FAMILIES[block_class] = family


def family_of(blk: nn.Module) -> BlockFamily | None:
    """The family of a block of exactly a registered class (a subclass may change the forward: not assumed); a
    prompted block counts as its original class."""
    return FAMILIES.get(original_class(blk))


def unsupported_attentions(blk: nn.Module) -> list[nn.Module]:
    """The block's attention modules that neither a TCPA attention mixin nor the block's own mixin covers."""
    family = family_of(blk)
    unsupported = [attn for attn, _ in family.sites(blk) if type(attn) not in ATTENTION_MIXINS]
    own = family.own_attention(blk)
    if own is not None and type(own) not in family.own_attention_types:
        unsupported.append(own)
    return unsupported


def single_site_projection(projection: Callable[[nn.Module, nn.Module], KVProjection]):
    """A family's ``kv_projection`` for blocks with one attention site: ``projection(attention, prompt_norm)``."""

    def of_block(blk):
        sites = family_of(blk).sites(blk)
        return projection(*sites[0]) if len(sites) == 1 else None

    return of_block


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
        norm.__class__ = prompted_class(FusedNormMixin, type(norm))


def detach_sites(blk: nn.Module) -> None:
    """Undo ``attach_sites`` on every module of the block (also a partial attach)."""
    blk.__dict__.pop("_tcpa_norm", None)
    for module in blk.modules():
        if module is not blk and "_prompted_base" in type(module).__dict__:
            module.__dict__.pop("_tcpa_site", None)
            module.__class__ = original_class(module)


def reject_attn_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal: prompted blocks do not take an attention mask, got "
                         f"attn_mask={None if attn_mask is None else tuple(attn_mask.shape)}, is_causal={is_causal}")


def block_prompt_kv(blk: nn.Module, fwd, layer, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the layer's prompt K/V [2, H, P, D] / [B, 2, H, P, D], or None; the prompt tokens its attentions project
    themselves when the K/V are None). From the forward's one pass over all layers where it made one; else from the
    block's own projection (FSDP2 shards: the block's weights are whole inside its own forward only); else the
    block's attentions project this call's prompt tokens."""
    kv = fwd.prompt_kv(layer, batch_size)
    if kv is not None:
        return kv, None
    tokens = blk.tcpa.prompt_tokens(batch_size)
    projection = layer.state.projections[layer.index]
    return (None, tokens) if projection is None else (layer_kv(projection, tokens), None)


def site_prompt_kv(call: LayerCall, project_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    """An attention's prompt K/V for this layer call: the layer's, or its own projection of the call's prompt tokens
    (``project_kv``: tokens [1 or B, P, C] -> keys, values [1 or B, H, P, D])."""
    if call.prompt_kv is not None:
        return call.prompt_kv
    shared = call.tokens.dim() == 2
    with torch.autocast(call.tokens.device.type, enabled=False):
        kv = torch.stack(project_kv(call.tokens[None] if shared else call.tokens), dim=1)  # [1 or B, 2, H, P, D]
    return kv[0] if shared else kv


# ---------------------------------------------------------------------------------------------------- blocks


@register_mixin
class FusedNormMixin:
    """A block's frozen pre-attention LayerNorm: called on the block input of the current layer call, it returns
    the norm the matching kernel computed in the same pass; on anything else (prompt tokens) it normalises."""

    def forward(self, input):
        normed = current_norm_output(input)
        return super().forward(input) if normed is None else normed


@register_mixin
class TCPABlockMixin:
    """A block whose own forward runs inside a layer call: its input selects the prompts, its swapped attention
    modules use them."""

    def forward(self, x, *args, **kwargs):
        reject_attn_mask(kwargs.get("attn_mask"), kwargs.get("is_causal", False))
        layer = self._prompt_layer
        fwd, record = join_forward(x, layer)
        # a prompt bank's forward: each sample's key set and prompt set (prompt_kv [T, 2, H, P, D]) by its task
        selection, terms, normed = self.tcpa.select(x, self._tcpa_norm, fwd.layer_bank(layer.index))
        record_terms(record, layer.index, terms)
        prompt_kv, tokens = block_prompt_kv(self, fwd, layer, x.shape[0])
        previous = enter_layer(LayerCall(self.tcpa, x, normed, selection, prompt_kv, tokens))
        try:
            out = super().forward(x, *args, **kwargs)
        finally:
            leave_layer(previous)
        return hand_on(out, fwd, record)


@register_mixin
class VPTMixin:
    """VPT: prompts are ordinary tokens (queries too) for the block's own forward. x [B, N, C] -> [B, N, C].

    The prompts go after the N real tokens (attention has no positions, so this is the published model) and the
    block returns the real tokens only: features taken between blocks (``forward_intermediates``) hold no prompts.
    Deep blocks bring their own prompts (dropped out per sample, then VFPT's Fourier transform when configured);
    without deep prompts the prompt tokens' output passes to the next block on its input tensor
    (``_forward.carry_on``: a checkpointed block recomputes with the prompts it had).
    """

    def forward(self, x, *args, **kwargs):
        reject_attn_mask(kwargs.get("attn_mask"), kwargs.get("is_causal", False))
        layer = self._prompt_layer
        state, cfg = layer.state, layer.state.config
        N = x.shape[1]
        fwd = record = None
        if not cfg.deep:
            fwd, record = join_forward(x, layer)
        if "vpt_prompts" in self._parameters:
            prompts = drop_prompts(self.vpt_prompts.to(x.dtype), cfg.prompt_dropout, state.training, x.shape[0])
            prompts = transform_prompts(prompts, cfg.prompt_transform, cfg.fourier_fraction)  # [B, P, C]
        else:
            prompts = carried_prompts(record, x, layer.index)
            if prompts is None:
                raise RuntimeError(f"VPT-shallow block {layer.index} got an input without the prompt tokens of "
                                   f"block {layer.index - 1}: without deep prompts the blocks run in order, from "
                                   "block 0")
        out = super().forward(torch.cat([x, prompts], dim=1), *args, **kwargs)  # [B, N+P, C], the block's own
        if fwd is None:
            return out[:, :N]
        tokens = hand_on(out[:, :N], fwd, record)
        return tokens if layer.is_last else carry_on(tokens, out[:, N:], record, layer.index)
