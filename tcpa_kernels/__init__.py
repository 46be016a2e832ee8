"""tcpa_kernels: fused Triton kernels for Token Coordinated Prompt Attention (TCPA, ICML 2025).

Public API (docs/how-it-works.md, 'Public API'): ``tcpa_attention``, ``match_prompts``, ``TCPAAttention`` /
``tcpa_fused_attention``, ``match_scores``, ``matching_loss``; the lean model-level pair ``match_select``
(matching, top-k and loss terms in one op) and ``tcpa_packed_attention`` (on timm's packed qkv, with a
``Selection``); ``TCPAPrompts``, one layer's prompts and TCPA attention as a module for hand-written ViTs;
``PromptBank``, many tasks' prompts on one backbone, a task per sample.
"""

from tcpa_kernels.bank import BankFeatures, BankOutput, PromptBank
from tcpa_kernels.checkpoint import from_pretrained, load_prompts, save_pretrained, save_prompts
from tcpa_kernels.integrations.input_prompter import InputPrompter
from tcpa_kernels.integrations.prompts import TCPAPrompts
from tcpa_kernels.ops.fused import TCPAAttention, tcpa_fused_attention
from tcpa_kernels.ops.match_prompts import match_prompts, match_scores, matching_loss
from tcpa_kernels.ops.match_select import match_select
from tcpa_kernels.ops.packed import tcpa_packed_attention
from tcpa_kernels.ops.selection import Selection
from tcpa_kernels.ops.tcpa_attention import tcpa_attention
from tcpa_kernels.vit import (
    PromptState,
    TCPAConfig,
    VPTConfig,
    apply_tcpa,
    apply_vpt,
    count_parameters,
    disable_prompts,
    find_model,
    get_matching_loss,
    print_trainable_parameters,
    remove_prompts,
    remove_tcpa,
    set_selection,
    trainable_parameters,
)

__version__ = "0.1.0"
__all__ = [
    "tcpa_attention", "match_prompts", "match_scores", "matching_loss", "match_select", "tcpa_packed_attention",
    "Selection", "TCPAAttention", "tcpa_fused_attention", "TCPAPrompts", "InputPrompter",
    "apply_tcpa", "apply_vpt", "remove_prompts", "remove_tcpa", "get_matching_loss", "set_selection",
    "trainable_parameters", "count_parameters", "print_trainable_parameters", "disable_prompts", "find_model",
    "save_prompts", "load_prompts", "save_pretrained", "from_pretrained", "TCPAConfig", "VPTConfig", "PromptState",
    "PromptBank", "BankOutput", "BankFeatures",
]
