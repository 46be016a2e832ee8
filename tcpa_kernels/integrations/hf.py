"""Hugging Face ``transformers`` (v5) vision transformers: ViT, DINOv2 (with registers), the CLIP and SigLIP vision
towers, and their image-classification models.

Every layer of these models is a pre-norm block whose self-attention is a module of its own with ``q_proj``,
``k_proj``, ``v_proj`` and an output projection, called as ``layer(hidden_states, attention_mask, **kwargs)``. Under
TCPA the layer's own forward runs after its input has selected the prompts (``family.TCPABlockMixin``) and its
attention module is swapped to one that attends over [selected prompts ; tokens]: the prompts go through the layer's
pre-attention norm and the attention's own K/V projections (prefix tokens, no position embedding). Under VPT the
layer's own forward runs on [tokens ; prompts].

Prompted layers take no attention mask and TCPA returns no attention weights: ``attention_mask`` (unless a bool mask
that masks nothing) and (TCPA) ``output_attentions=True`` are refused with a ``ValueError``; ``output_hidden_states``
works (the real tokens). The SigLIP attention-pooling head and CLIP's visual projection are backbone modules, not
classification heads; models without a ``classifier`` take no ``num_classes``. Image-classification models keep
``config.num_labels`` (and the label names) in step with their ``classifier``: a new head (``num_classes``) gets the
model its own copy of its config (the config object given to the constructor may be shared by other models), and
``remove_prompts`` gives the model back the config objects it had. The frozen backbone stays in eval mode, so
transformers' gradient checkpointing, which runs in training mode only, does not run on prompted layers.

A subclass of a supported class is prompted as its base class. A prompted model refuses ``save_pretrained`` (and
``push_to_hub``): ``from_pretrained`` would load it back as the plain model, dropping the prompts as unexpected keys.
The library saves the prompts (``tk.save_pretrained(model, dir)``, ``tk.save_prompts``) and loads them into the plain
model (``tk.from_pretrained``, ``tk.load_prompts``); after ``tk.remove_prompts`` the model saves as before.
"""

import copy
import math
from collections.abc import Callable
from typing import NoReturn

import torch
import transformers
from torch import nn

MIN_TRANSFORMERS = (5, 18)  # attention modules with q_proj/k_proj/v_proj in every supported model (DINOv2: 5.18)
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < MIN_TRANSFORMERS:  # before v5 imports
    raise ImportError(f"transformers: the TCPA integration expects transformers >= "
                      f"{'.'.join(map(str, MIN_TRANSFORMERS))} (its attention-module layout), "
                      f"got {transformers.__version__}")

from transformers.models.clip.modeling_clip import (  # noqa: E402
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPForImageClassification,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.dinov2.modeling_dinov2 import (  # noqa: E402
    Dinov2Attention,
    Dinov2ForImageClassification,
    Dinov2Layer,
    Dinov2Model,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (  # noqa: E402
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import (  # noqa: E402
    SiglipAttention,
    SiglipEncoderLayer,
    SiglipForImageClassification,
    SiglipVisionModel,
)
from transformers.models.vit.modeling_vit import (  # noqa: E402
    ViTAttention,
    ViTForImageClassification,
    ViTLayer,
    ViTModel,
)

try:  # where transformers 5 keys the outputs a model class can record (hidden states); private, so optional
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:
    _CAN_RECORD_REGISTRY = None

from tcpa_kernels._forward import layer_call  # noqa: E402
from tcpa_kernels._patch import original_class, prompted_class, register_mixin  # noqa: E402
from tcpa_kernels._prompt_kv import KVProjection, Rows  # noqa: E402
from tcpa_kernels._validate import describe  # noqa: E402
from tcpa_kernels.integrations.family import (  # noqa: E402
    ATTENTION_MIXINS,
    BlockFamily,
    TCPABlockMixin,
    VPTMixin,
    register_family,
    single_site_projection,
    site_prompt_kv,
)
from tcpa_kernels.integrations.models import ModelFamily, register_model  # noqa: E402
from tcpa_kernels.vit import PromptedMixin  # noqa: E402

ORIGINAL_CONFIGS = "_tcpa_original_configs"  # the model's attribute: {module name: the config it had} while prompted


def reject_layer_inputs(attention_mask: torch.Tensor | None, kwargs: dict, config=None) -> None:
    """A prompted layer's inputs: no attention mask, head mask or causal attention; no attention weights (``config``
    given: its ``output_attentions`` is the default, as for the model).

    The one mask let through is a bool mask that masks nothing: what transformers builds for SDPA layers where it
    cannot skip building it (under ``torch.compile`` with some torch versions). Under compilation its values are
    checked by a device-side assertion, which keeps the graph whole."""
    if attention_mask is not None:
        refusal = ("attention_mask: prompted layers take no attention mask (the prompts change the keys), expected "
                   "None (or a bool mask that masks nothing)")
        if attention_mask.dtype == torch.bool and torch.compiler.is_compiling():
            torch._assert_async(attention_mask.all(), refusal)
        elif attention_mask.dtype != torch.bool or not attention_mask.all():
            raise ValueError(f"{refusal}, got {describe(attention_mask)}")
    if kwargs.get("head_mask") is not None:
        raise ValueError(f"head_mask: prompted layers take no head mask, expected None, got "
                         f"{describe(kwargs['head_mask'])}")
    if kwargs.get("is_causal"):
        raise ValueError(f"is_causal: prompted layers attend bidirectionally, expected False, got "
                         f"{kwargs['is_causal']!r}")
    if config is not None and kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions: TCPA attention returns no attention weights, expected False (argument "
                         "and config.output_attentions), got True")


# ------------------------------------------------------------------------------------------------ attention


def _heads(attn: nn.Module, h: torch.Tensor, *projections: nn.Linear) -> list[torch.Tensor]:
    """h [B, S, C] through each projection, split into heads: [B, H, S, D] each."""
    B, S, _ = h.shape
    return [proj(h).view(B, S, -1, attn.head_dim).transpose(1, 2) for proj in projections]


def site_attention(attn: nn.Module, hidden_states: torch.Tensor, out_proj: nn.Linear, scale: float) -> torch.Tensor:
    """TCPA attention of a swapped attention module: its input hidden_states [B, N, C] -> [B, N, C]."""
    site = attn._tcpa_site
    call = layer_call(site.prompts)
    q, k, v = _heads(attn, hidden_states, attn.q_proj, attn.k_proj, attn.v_proj)  # [B, H, N, D]
    prompt_kv = site_prompt_kv(call, lambda p: _heads(attn, site.prompt_norm(p), attn.k_proj, attn.v_proj))
    out = site.prompts.attend(q, k, v, prompt_kv, call.selection, scale=scale)  # [B, H, N, D]
    return out_proj(out.transpose(1, 2).flatten(2))  # [B, N, H*D] -> [B, N, C]


def attention_kv(attn: nn.Module, prompt_norm: nn.Module) -> KVProjection:
    """The prompt K/V projection of a transformers attention: its k_proj and v_proj after the layer's norm."""
    k_proj, v_proj = attn.k_proj, attn.v_proj
    biases = None if k_proj.bias is None else (Rows(k_proj, "bias"), Rows(v_proj, "bias"))
    return KVProjection(prompt_norm, (Rows(k_proj, "weight"), Rows(v_proj, "weight")), biases, None,
                        k_proj.out_features // attn.head_dim, attn.head_dim)


@register_mixin
class TCPAHFAttentionMixin:
    """ViT / DINOv2 attention (``o_proj``, ``scaling``) over [selected prompts ; tokens]; returns (output, None) as
    the original does without attention weights."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        reject_layer_inputs(attention_mask, kwargs, self.config)
        return site_attention(self, hidden_states, self.o_proj, self.scaling), None


@register_mixin
class TCPAHFCLIPAttentionMixin:
    """CLIP / SigLIP attention (``out_proj``, ``scale``) over [selected prompts ; tokens]; returns (output, None)
    as the original does without attention weights."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        reject_layer_inputs(attention_mask, kwargs, self.config)
        return site_attention(self, hidden_states, self.out_proj, self.scale), None


# ---------------------------------------------------------------------------------------------------- layers


@register_mixin
class HFVPTMixin(VPTMixin):
    """VPT on a transformers layer: ``layer(hidden_states, attention_mask=None, **kwargs)``, no attention mask."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        reject_layer_inputs(attention_mask, kwargs)
        return super().forward(hidden_states, None, **kwargs)


def _sites(attention: str, norm: str) -> Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]:
    """A layer's one site: its attention module and pre-attention norm, by attribute name."""
    return lambda layer: [(getattr(layer, attention), getattr(layer, norm))]


# ---------------------------------------------------------------------------------------------------- models


def hf_model_family(name: str, layers: str, *, backbone: str = "", prefix: Callable[[object], int] = lambda c: 1,
                    head_width: int = 0, patches: str = "embeddings.patch_embeddings") -> ModelFamily:
    """A transformers model whose layers are at ``backbone.layers`` (dotted attribute paths; ``backbone`` is the
    vision model holding the config, "" for the model itself).

    ``prefix(config)``: tokens before the patches. ``head_width``: 0 for a model without a classification head,
    else the ``classifier``'s input width in multiples of ``hidden_size``. ``patches``: the patch embedding (the
    module that takes ``pixel_values``) under ``backbone``.
    """

    def config(model):
        return model.get_submodule(backbone).config

    def num_classes(model):
        return model.config.num_labels if head_width else 0

    def reset_head(model, n):
        if not head_width:
            raise ValueError(f"num_classes: {type(model).__name__} has no classification head (it returns "
                             f"features), expected None, got {n}")
        own_config(model)
        width = head_width * config(model).hidden_size
        model.classifier = nn.Linear(width, n) if n > 0 else nn.Identity()  # as the model's __init__ makes it
        model.config.num_labels = model.num_labels = n

    def set_num_classes(model, n):  # on remove_prompts: the config objects the model had, labels and all
        if restore_config(model):
            model.num_labels = n

    def patch_area(model):
        size = config(model).patch_size
        return math.prod(size) if isinstance(size, list | tuple) else size * size

    return ModelFamily(name, blocks=lambda m: m.get_submodule(backbone).get_submodule(layers),
                       num_prefix_tokens=lambda m: prefix(config(m)), embed_dim=lambda m: config(m).hidden_size,
                       patch_area=patch_area, heads=("classifier",) if head_width else (), num_classes=num_classes,
                       reset_head=reset_head, set_num_classes=set_num_classes, prepare=prepare_class,
                       patch_embedding=lambda m: m.get_submodule(backbone).get_submodule(patches))


def own_config(model: nn.Module) -> None:
    """Give the model a copy of its config before its labels change (the config object may be shared with other
    models): every module of the model holding the config or one of its sub-configs (the vision config of a CLIP
    model) gets the copy's, and the model keeps the originals for ``restore_config``."""
    if ORIGINAL_CONFIGS in model.__dict__:
        return
    copies: dict[int, object] = {}  # id(original) -> its copy, for the config and everything in it
    copy.deepcopy(model.config, copies)
    originals: dict[str, transformers.PretrainedConfig] = {}
    for name, module in model.named_modules():
        held = module.__dict__.get("config")
        if held is not None and id(held) in copies:
            originals[name] = held
            module.config = copies[id(held)]
    model.__dict__[ORIGINAL_CONFIGS] = originals


def restore_config(model: nn.Module) -> bool:
    """Undo ``own_config``: each module gets back the config object it had; False when the model kept its own."""
    originals = model.__dict__.pop(ORIGINAL_CONFIGS, None)
    for name, held in (originals or {}).items():
        model.get_submodule(name).config = held
    return originals is not None


def refuse_saving(method: str) -> Callable[..., NoReturn]:
    """``save_pretrained`` / ``push_to_hub`` of a prompted model: refused, as ``from_pretrained`` would silently drop
    the prompts."""

    def refuse(self: nn.Module, *args, **kwargs) -> NoReturn:
        base = original_class(self).__name__
        raise ValueError(
            f"model: {method} expects a {base} without prompts, got one with {self.prompt_state.method} prompts "
            f"({base}.from_pretrained would load it as the plain {base}, dropping the prompts as unexpected keys); "
            "save them with tk.save_pretrained(model, dir) (a folder) or tk.save_prompts(model, path) (a file) and "
            "load them into the plain model with tk.from_pretrained(model, dir) / tk.load_prompts(model, path), or "
            f"call tk.remove_prompts(model) first to {method} the model without them")

    refuse.__name__ = refuse.__qualname__ = method
    return refuse


REFUSED_METHODS = {method: refuse_saving(method) for method in ("save_pretrained", "push_to_hub")}


def prepare_class(model_class: type) -> None:
    """The prompted class of ``model_class`` (a registered class or a subclass of one) records the outputs
    ``model_class`` does (transformers keys a model's ``output_hidden_states`` capture by the name of its class:
    without it, no hidden states) and refuses ``save_pretrained`` and ``push_to_hub``."""
    prompted = prompted_class(PromptedMixin, model_class)
    for method, refuse in REFUSED_METHODS.items():
        setattr(prompted, method, refuse)
    if _CAN_RECORD_REGISTRY is not None:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(prompted), model_class._can_record_outputs)


def register_hf_model(model_class: type, family: ModelFamily) -> None:
    """``register_model``, with the prompted class prepared now (a pickled prompted model loads in a fresh process
    as soon as this module is imported)."""
    register_model(model_class, family)
    prepare_class(model_class)


def _registers(config) -> int:
    return 1 + config.num_register_tokens


register_hf_model(ViTModel, hf_model_family("transformers ViTModel", "layers"))
register_hf_model(ViTForImageClassification, hf_model_family("transformers ViTForImageClassification", "layers",
                                                             backbone="vit", head_width=1))
register_hf_model(Dinov2Model, hf_model_family("transformers Dinov2Model", "encoder.layer"))
register_hf_model(Dinov2ForImageClassification, hf_model_family(
    "transformers Dinov2ForImageClassification", "encoder.layer", backbone="dinov2", head_width=2))
register_hf_model(Dinov2WithRegistersModel, hf_model_family("transformers Dinov2WithRegistersModel",
                                                            "encoder.layer", prefix=_registers))
register_hf_model(Dinov2WithRegistersForImageClassification, hf_model_family(
    "transformers Dinov2WithRegistersForImageClassification", "encoder.layer", backbone="dinov2_with_registers",
    prefix=_registers, head_width=2))
_CONV = "embeddings.patch_embedding"  # CLIP and SigLIP: the patch embedding is the Conv2d itself
register_hf_model(CLIPVisionModel, hf_model_family("transformers CLIPVisionModel", "encoder.layers", patches=_CONV))
register_hf_model(CLIPVisionModelWithProjection, hf_model_family("transformers CLIPVisionModelWithProjection",
                                                                 "encoder.layers", backbone="vision_model",
                                                                 patches=_CONV))
register_hf_model(CLIPForImageClassification, hf_model_family("transformers CLIPForImageClassification",
                                                              "encoder.layers", backbone="vision_model",
                                                              head_width=1, patches=_CONV))
register_hf_model(SiglipVisionModel, hf_model_family("transformers SiglipVisionModel", "encoder.layers",
                                                     prefix=lambda c: 0, patches=_CONV))
register_hf_model(SiglipForImageClassification, hf_model_family("transformers SiglipForImageClassification",
                                                                "encoder.layers", backbone="vision_model",
                                                                prefix=lambda c: 0, head_width=1, patches=_CONV))

for attention_class in (ViTAttention, Dinov2Attention, Dinov2WithRegistersAttention):
    ATTENTION_MIXINS[attention_class] = TCPAHFAttentionMixin
for attention_class in (CLIPAttention, SiglipAttention):
    ATTENTION_MIXINS[attention_class] = TCPAHFCLIPAttentionMixin
for layer_class, attention, norm in ((ViTLayer, "attention", "layernorm_before"), (Dinov2Layer, "attention", "norm1"),
                                     (Dinov2WithRegistersLayer, "attention", "norm1"),
                                     (CLIPEncoderLayer, "self_attn", "layer_norm1"),
                                     (SiglipEncoderLayer, "self_attn", "layer_norm1")):
    register_family(layer_class, BlockFamily(f"transformers {layer_class.__name__} (pre-norm)", TCPABlockMixin,
                                             HFVPTMixin, _sites(attention, norm),
                                             kv_projection=single_site_projection(attention_kv)))
