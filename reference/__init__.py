"""Plain-PyTorch reference of TCPA (docs/how-it-works.md, 'Matching and selection' to 'In a ViT block'): readable,
dense, autograd-only.

Every backend of ``tcpa_kernels`` is tested against these functions evaluated in float64.
They build the full ``[B, H, N, P+N]`` score tensor on purpose: clarity over memory.
"""

from reference.attention import tcpa_attention_ref, vpt_attention_ref
from reference.matching import match_prompts_ref, prompt_entry_index

__all__ = ["tcpa_attention_ref", "vpt_attention_ref", "match_prompts_ref", "prompt_entry_index"]
