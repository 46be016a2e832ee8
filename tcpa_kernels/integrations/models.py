"""What a model family tells ``apply_tcpa`` / ``apply_vpt``: where its blocks, prefix tokens and heads are.

A :class:`ModelFamily` is registered per model class (``register_model``); ``model_family(model)`` finds the one of
a model (of its class or the nearest base class: a subclass is prompted as its base), importing the integrations of
the packages the classes come from (timm, transformers, open_clip) on first use, so optional dependencies are
imported only by people who use them. Block-level behaviour (how a block runs with prompts) is the block families'
business (``family.py``).
"""

import dataclasses
import importlib
from collections.abc import Callable

from torch import nn

from tcpa_kernels._patch import original_class

# top-level package of a model's class -> the integration modules that register its families
INTEGRATIONS = {
    "timm": ("tcpa_kernels.integrations.timm_vit", "tcpa_kernels.integrations.timm_eva", "tcpa_kernels.dense_baseline"),
    "transformers": ("tcpa_kernels.integrations.hf",),
    "open_clip": ("tcpa_kernels.integrations.open_clip",),
}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to reach into one model class.

    - ``blocks(model)``: the transformer blocks, in order (every one is prompted);
    - ``num_prefix_tokens(model)``: tokens before the patches (CLS, registers, distillation) at the blocks' input;
    - ``embed_dim(model)``: the residual stream's width C;
    - ``patch_area(model)``: pixels per patch (VPT's prompt initialisation);
    - ``heads``: attribute names of the classification heads (each a module or absent);
    - ``num_classes(model)`` / ``reset_head(model, n)``: read / replace the classes of the head(s) (``reset_head``
      also restores ``num_classes`` when ``remove_prompts`` puts the original heads back, with ``n`` = the old count);
    - ``prepare(model_class)``: readies the prompted class of ``model_class`` (the registered class or a subclass of
      it) to behave as the registered class's does; ``model_family`` calls it for the model's class (no-op default);
    - ``patch_embedding(model)``: the module that takes the image first (its first argument, ``[B, C, H, W]``), which
      the input prompter runs before (``apply_tcpa(..., input_prompter=True)``); None (the default) for a family
      without one.
    """

    name: str
    blocks: Callable[[nn.Module], nn.ModuleList]
    num_prefix_tokens: Callable[[nn.Module], int]
    embed_dim: Callable[[nn.Module], int]
    patch_area: Callable[[nn.Module], int]
    heads: tuple[str, ...]
    num_classes: Callable[[nn.Module], int]
    reset_head: Callable[[nn.Module, int], None]
    set_num_classes: Callable[[nn.Module, int], None]
    prepare: Callable[[type], None] = lambda model_class: None
    patch_embedding: Callable[[nn.Module], nn.Module | None] = lambda model: None


MODEL_FAMILIES: dict[type, ModelFamily] = {}

_ADDITIVE_BIAS = ("adds a relative-position bias to every (query, key) score; the TCPA op has no additive token "
                  "bias (and prompts would need a bias of their own)")
_DIFFERENTIAL = "differential attention subtracts two softmaxes per head; the TCPA op computes one"
# "module.Class" of a model or block -> why apply_tcpa / apply_vpt refuse it
REFUSED = {
    "timm.models.naflexvit.NaFlexVit": "its batches carry per-sample key-padding masks (variable token counts); "
                                       "the TCPA op has no key-padding length",
    "timm.models.beit.Beit": _ADDITIVE_BIAS,
    "timm.models.vision_transformer_relpos.VisionTransformerRelPos": _ADDITIVE_BIAS,
    "timm.models.vision_transformer.DiffParallelScalingBlock": _DIFFERENTIAL,
    "timm.layers.diff_attention.DiffAttention": _DIFFERENTIAL,
}


def register_model(model_class: type, family: ModelFamily) -> None:
    MODEL_FAMILIES[model_class] = family


def load_integrations(module_name: str) -> None:
    """Import the integrations for classes of ``module_name``'s top-level package (no-op for other packages)."""
    for integration in INTEGRATIONS.get(module_name.partition(".")[0], ()):
        importlib.import_module(integration)


def model_family(model: nn.Module) -> ModelFamily | None:
    """The family of the nearest registered class in the MRO of the model's class (before patching): a subclass
    keeps its base's layout (a user's class in a module of its own finds the integration of its base's package);
    the family prepares the model's class (``ModelFamily.prepare``)."""
    model_class = original_class(model)
    for cls in model_class.__mro__:
        load_integrations(cls.__module__)
    family = next((MODEL_FAMILIES[cls] for cls in model_class.__mro__ if cls in MODEL_FAMILIES), None)
    if family is not None:
        family.prepare(model_class)
    return family


def refusal(module: nn.Module) -> str:
    """Why the class of a model, block or attention is refused ("" when no reason is known)."""
    for cls in type(module).__mro__:
        reason = REFUSED.get(f"{cls.__module__}.{cls.__qualname__}")
        if reason:
            return f": {reason}"
    return ""


SUPPORTED = ("timm VisionTransformer (ViT, DeiT, ...) or Eva (EVA-02, RoPE ViTs, DINOv3, PE), a Hugging Face ViT, "
             "DINOv2, CLIP or SigLIP vision model, an open_clip vision tower or CLIP model")
