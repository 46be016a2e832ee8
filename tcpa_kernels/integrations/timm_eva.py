"""timm ``Eva`` blocks: EVA-02, RoPE ViTs, DINOv3 and Perception Encoder (``EvaBlock``, post-norm
``EvaBlockPostNorm``) with ``EvaAttention`` or ``AttentionRope`` (fused or separate projections, grouped K/V
heads, q/k norm, scale norm, gating).

Prompts are prefix tokens without position: they go through the block's ``norm1`` (post-norm: nothing) and the
attention's own K/V projection and k norm, and get no rotary embedding; the tokens are rotated exactly as the
attention does it (after its ``num_prefix_tokens``).
"""

import torch
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from tcpa_kernels._patch import register_mixin
from tcpa_kernels.integrations.family import (
    ATTENTION_MIXINS,
    BlockFamily,
    TCPABlockMixin,
    VPTMixin,
    register_family,
    single_site_projection,
)
from tcpa_kernels.integrations.models import register_model
from tcpa_kernels.integrations.timm_vit import TCPARopeAttentionMixin, attention_kv, timm_model_family


@register_mixin
class VPTRopeMixin(VPTMixin):
    """VPT on a RoPE block: the prompts after the tokens get the identity rotation (sin 0, cos 1), no position."""

    def forward(self, x, rope=None, **kwargs):
        if rope is not None:  # [..., N - prefix, 2 * D'] (sin ; cos) -> [..., N - prefix + P, 2 * D']
            num_prompts = self._prompt_layer.state.config.num_prompts
            sin, cos = rope.chunk(2, dim=-1)
            shape = (*rope.shape[:-2], num_prompts, sin.shape[-1])
            rope = torch.cat([torch.cat([sin, sin.new_zeros(shape)], dim=-2),
                              torch.cat([cos, cos.new_ones(shape)], dim=-2)], dim=-1)
        return super().forward(x, rope=rope, **kwargs)


register_model(Eva, timm_model_family("timm Eva"))
ATTENTION_MIXINS[EvaAttention] = TCPARopeAttentionMixin
ATTENTION_MIXINS[AttentionRope] = TCPARopeAttentionMixin
register_family(EvaBlock, BlockFamily("timm EvaBlock (pre-norm, RoPE)", TCPABlockMixin, VPTRopeMixin,
                                      lambda blk: [(blk.attn, blk.norm1)],
                                      kv_projection=single_site_projection(attention_kv)))
register_family(EvaBlockPostNorm, BlockFamily("timm EvaBlockPostNorm (post-norm, RoPE)", TCPABlockMixin, VPTRopeMixin,
                                              lambda blk: [(blk.attn, nn.Identity())],
                                              kv_projection=single_site_projection(attention_kv)))
