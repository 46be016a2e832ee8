"""tcpa_kernels: fused Triton kernels for Token Coordinated Prompt Attention (TCPA, ICML 2025).

Public API (TCPA_SPEC.md §5): ``tcpa_attention``, ``match_prompts``, ``TCPAAttention`` /
``tcpa_fused_attention``, ``match_scores``, ``matching_loss``.
"""

from tcpa_kernels import _backend  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA first)
from tcpa_kernels.ops.fused import TCPAAttention, tcpa_fused_attention
from tcpa_kernels.ops.match_prompts import match_prompts, match_scores, matching_loss
from tcpa_kernels.ops.tcpa_attention import tcpa_attention

__version__ = "0.1.0"
__all__ = ["tcpa_attention", "match_prompts", "match_scores", "matching_loss", "TCPAAttention",
           "tcpa_fused_attention"]
