"""timm ``Eva`` blocks: EVA-02, RoPE ViTs, DINOv3 and Perception Encoder (``EvaBlock``, post-norm
``EvaBlockPostNorm``) with ``EvaAttention`` or ``AttentionRope`` (fused or separate projections, grouped K/V
heads, q/k norm, scale norm, gating).

Prompts are prefix tokens without position: they go through the block's ``norm1`` (post-norm: nothing) and the
attention's own K/V projection and k norm, and get no rotary embedding; the tokens are rotated exactly as the
attention does it (after its ``num_prefix_tokens``).
"""

from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from tcpa_kernels.integrations.family import (
    ATTENTION_MIXINS,
    BlockFamily,
    TCPABlockMixin,
    TCPARopeAttentionMixin,
    VPTMixin,
    register_family,
)
from tcpa_kernels.integrations.models import register_model
from tcpa_kernels.integrations.timm_vit import timm_model_family

register_model(Eva, timm_model_family("timm Eva"))
ATTENTION_MIXINS[EvaAttention] = TCPARopeAttentionMixin
ATTENTION_MIXINS[AttentionRope] = TCPARopeAttentionMixin
register_family(EvaBlock, BlockFamily("timm EvaBlock (pre-norm, RoPE)", TCPABlockMixin, VPTMixin,
                                      lambda blk: [(blk.attn, blk.norm1)]))
register_family(EvaBlockPostNorm, BlockFamily("timm EvaBlockPostNorm (post-norm, RoPE)", TCPABlockMixin, VPTMixin,
                                              lambda blk: [(blk.attn, nn.Identity())]))
