"""Turn an existing ViT into a TCPA or VPT-deep model, in place (TCPA_SPEC.md §1, §4).

Supported (README, "Supported models"): timm ``VisionTransformer`` (``Block``, ``ResPostBlock``,
``ParallelThingsBlock``, ``ParallelScalingBlock``) and ``Eva`` (EVA-02, RoPE ViTs, DINOv3, Perception Encoder),
Hugging Face ViT / DINOv2 / CLIP / SigLIP vision models, open_clip vision towers and CLIP models. A model's family
(``integrations/models.py``) says where its blocks, prefix tokens and heads are; each block's family
(``integrations/family.py`` and one file per package) how it runs with prompts.

Each block keeps its own modules and gets a ``tcpa`` submodule (a
:class:`~tcpa_kernels.integrations.prompts.TCPAPrompts`: ``blocks.{i}.tcpa.keys_cls`` ...) or a ``vpt_prompts``
parameter, so every original ``state_dict`` key stays. Blocks, swapped attention modules and the model change
class to generated subclasses of their own (``_patch.py``): a prompted model pickles, deep-copies and saves like
any module. The backbone is frozen and kept in eval mode; the trainable parameters are the prompts, the keys and
the classification head. ``remove_prompts(model)`` undoes everything.

A prompted model's state is its parameters and its config (``model.prompt_state``, a :class:`PromptState`; the
selection mode of each ``TCPAPrompts``, ``set_selection``). What one forward computes (every layer's prompt K/V, the
selections, the matching-loss terms) belongs to that call (``_forward.py``): ``get_matching_loss`` reads the last
forward this thread ran. Every entry point here accepts the model inside DataParallel / DistributedDataParallel /
torch.compile wrappers, checks all of its arguments before it changes anything, and leaves the model as it was when it
fails.
"""

import dataclasses
import math
import threading

import torch
from torch import nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._forward import last_forward, loose_matching_loss
from tcpa_kernels._patch import is_fully_sharded, original_class, prompted_class, register_mixin, unwrap
from tcpa_kernels._validate import check_flag, check_int
from tcpa_kernels.integrations.family import attach_sites, detach_sites, family_of, unsupported_attentions
from tcpa_kernels.integrations.models import SUPPORTED, ModelFamily, model_family, refusal
from tcpa_kernels.integrations.prompt_tokens import check_prompt_options
from tcpa_kernels.integrations.prompts import SELECTION_MODES, PoolConfig, TCPAPrompts, prompt_modules


@dataclasses.dataclass
class TCPAConfig(PoolConfig):
    """A TCPA model's config: every layer's pools (:class:`PoolConfig`) and the new head."""

    num_classes: int | None = None

    def validate(self, model, models: ModelFamily):
        super().validate(models.num_prefix_tokens(model))
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 0)
        resolve_backend(self.backend, next(model.parameters()).device)


@dataclasses.dataclass
class VPTConfig:
    num_prompts: int = 36
    deep: bool = True
    prompt_dropout: float = 0.1
    num_classes: int | None = None
    prompt_transform: str = "none"
    fourier_fraction: float = 1.0

    def validate(self, model, models: ModelFamily):
        check_int("num_prompts", self.num_prompts, 1)
        check_flag("deep", self.deep)
        check_prompt_options(self.prompt_dropout, self.prompt_transform, self.fourier_fraction)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 0)


@dataclasses.dataclass
class PromptState:
    """A prompted model's config and links (``model.prompt_state``); not a module, holds no parameters and, of a
    forward, only ``last``.

    ``last`` is per thread: ``last.record``, the last forward this thread ran on the model with its loss terms
    (``_forward.LastForward``), which ``get_matching_loss`` reads. Pickling and ``copy.deepcopy`` drop it.
    ``token`` is the model's name in its forwards (a forward holds it, not the state, so that a model is freed with
    the forwards it keeps).
    """

    method: str  # "tcpa" | "vpt"
    config: TCPAConfig | VPTConfig
    training: bool = False
    blocks: list = dataclasses.field(default_factory=list)  # the prompted blocks, in order
    original_heads: dict = dataclasses.field(default_factory=dict)
    original_num_classes: int = 0
    original_requires_grad: dict = dataclasses.field(default_factory=dict)
    projections: list = dataclasses.field(default_factory=list)  # TCPA: each block's prompt K/V projection, or None
    last: threading.local = dataclasses.field(default_factory=threading.local, repr=False, compare=False)
    token: object = dataclasses.field(default_factory=object, repr=False, compare=False)  # what its forwards name

    def __getstate__(self):
        return {name: value for name, value in self.__dict__.items() if name != "last"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.last = threading.local()


@dataclasses.dataclass
class _LayerRef:
    state: PromptState
    index: int
    is_last: bool


# ----------------------------------------------------------------------------------------------- model


@register_mixin
class PromptedMixin:
    """``model.train(mode)``: the frozen backbone stays in eval (no dropout / drop path); prompt dropout follows."""

    def train(self, mode: bool = True):
        check_flag("mode", mode)
        super().train(False)
        self.training = mode
        self.prompt_state.training = mode
        for prompts in prompt_modules(self):
            prompts.training = mode
        return self


# ------------------------------------------------------------------------------------------- patching


def _check_model(model) -> ModelFamily:
    """The model's family, after checking that every block can be prompted."""
    models = model_family(model)
    if models is None:
        raise TypeError(f"model: expected a {SUPPORTED} (README, 'Supported models'), got "
                        f"{type(model).__module__}.{type(model).__name__}{refusal(model)}")
    if hasattr(model, "prompt_state"):
        raise ValueError(f"model: already has {model.prompt_state.method} prompts; call remove_prompts(model) first")
    if any(is_fully_sharded(m) for m in model.modules()):
        raise ValueError("model: fully_shard (FSDP2) was already applied; add prompts first, then shard, so the "
                         "prompt parameters are sharded with the rest")
    blocks = models.blocks(model)
    first = family_of(blocks[0])
    for i, blk in enumerate(blocks):
        family = family_of(blk)
        unsupported = [blk] if family is None else unsupported_attentions(blk)
        if unsupported:
            reason = next((refusal(m) for m in unsupported if refusal(m)), "")
            raise TypeError(f"model.blocks[{i}]: no TCPA/VPT integration for {type(blk).__name__} with "
                            f"{[type(m).__name__ for m in blk.children()]}{reason}; supported blocks: README, "
                            "'Supported models'")
        if family is not first:
            raise TypeError(f"model.blocks[{i}]: expected every block of one family ({first.name}), got "
                            f"{type(blk).__name__}")
    return models


def _target(model):
    """The model to patch: torch.compile's wrapper is looked through; data-parallel wrappers are refused because
    they registered the parameters already."""
    inner = unwrap(model)
    if inner is not model and not hasattr(model, "_orig_mod"):
        raise ValueError(f"model: add prompts before wrapping the model in {type(model).__name__} (the wrapper has "
                         "registered its parameters already)")
    return inner


def _reference_param(blocks):
    """A backbone parameter: the device and dtype new prompts and heads get."""
    return next(blocks[0].parameters())


def _attach(model, models, method, config, make_additions, block_mixin=None):
    """Freeze the backbone, add per-block modules/parameters from make_additions(i, block), swap classes (blocks to
    their family's mixin, or to ``block_mixin``), reset the head. Nothing is changed before every argument is checked;
    a failure on the way undoes what was done."""
    config.validate(model, models)
    blocks = list(models.blocks(model))
    ref = _reference_param(blocks)
    state = PromptState(method=method, config=config, blocks=blocks, original_num_classes=models.num_classes(model))
    state.original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state.original_heads = {name: getattr(model, name) for name in models.heads
                            if isinstance(getattr(model, name, None), nn.Module)}
    additions = [{name: value.to(device=ref.device, dtype=ref.dtype) for name, value in make_additions(i, blk).items()}
                 for i, blk in enumerate(blocks)]
    family = family_of(blocks[0])
    training = model.training
    try:
        model.requires_grad_(False)
        for i, (blk, added) in enumerate(zip(blocks, additions)):
            for name, value in added.items():
                if isinstance(value, nn.Module):
                    blk.add_module(name, value)
                else:
                    blk.register_parameter(name, nn.Parameter(value))
            blk._prompt_layer = _LayerRef(state, i, i == len(blocks) - 1)
            if method == "tcpa" and block_mixin is None:
                attach_sites(blk, family)
            mixin = block_mixin or (family.tcpa if method == "tcpa" else family.vpt)
            blk.__class__ = prompted_class(mixin, type(blk))
        if method == "tcpa":
            state.projections = [family.kv_projection(blk) for blk in blocks]
        if config.num_classes is not None:
            models.reset_head(model, config.num_classes)
        for name in state.original_heads:
            getattr(model, name).to(device=ref.device, dtype=ref.dtype).requires_grad_(True)
        model.prompt_state = state
        model.__class__ = prompted_class(PromptedMixin, type(model))
        model.train(training)
    except BaseException:
        _detach(model, models, state, training)
        raise
    return model


def _detach(model, models, state, training):
    """Undo _attach, also a partial one: classes, added modules and parameters, heads, requires_grad flags, train
    mode."""
    for blk in state.blocks:
        detach_sites(blk)
        blk._modules.pop("tcpa", None)
        blk._parameters.pop("vpt_prompts", None)
        blk.__dict__.pop("_prompt_layer", None)
        blk.__class__ = original_class(blk)
    current = {name: getattr(model, name) for name in state.original_heads}
    for name, head in state.original_heads.items():  # in the dtype/device the model was moved to meanwhile
        like = next(current[name].parameters(), None)
        like = like if like is not None else _reference_param(state.blocks)
        setattr(model, name, head.to(device=like.device, dtype=like.dtype))
    models.set_num_classes(model, state.original_num_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(name, p.requires_grad))
    model.__dict__.pop("prompt_state", None)
    model.__class__ = original_class(model)
    model.train(training)


def apply_tcpa(model: nn.Module, *, pool_size_cls: int = 18, pool_size_img: int = 18, topk_cls: int = 10,
               topk_img: int = 10, prompt_len_cls: int = 1, prompt_len_img: int = 1, prompt_dropout: float = 0.1,
               renormalize: bool = False, num_classes: int | None = None, backend: str = "auto",
               prompt_dropout_per_sample: bool = False, prompt_transform: str = "none",
               fourier_fraction: float = 1.0) -> nn.Module:
    """Make ``model`` (a supported ViT, README "Supported models") a TCPA model in place and return it.

    Args:
        pool_size_cls, pool_size_img: entries of the CLS and image prompt pools per layer (Pc, Pi; Pc+Pi <= 64).
        topk_cls, topk_img: entries each prefix / patch token selects.
        prompt_len_cls, prompt_len_img: prompt tokens per pool entry (Lc, Li).
        prompt_dropout: dropout on the prompt tokens in training (one mask shared by the batch by default).
        renormalize: False = post-softmax mask as published; True = masked softmax.
        num_classes: replace the classification head with a new one of this many classes (None: keep it).
        backend: "auto" | "triton" | "torch" for the attention and selection kernels.
        prompt_dropout_per_sample: one dropout mask per sample, as the published code (the prompt keys/values
            become [B, H, P, D] in training, B times the work of the shared [H, P, D]); default one for the batch.
        prompt_transform: "none", or "fourier" for VFPT+TCPA (the published configuration, TCPA_SPEC.md §7): each
            layer's prompt tokens (CLS pool then image pool), after dropout, become ``fft2(prompts).real``.
        fourier_fraction: in (0, 1], VFPT's "Fourier percentage": only the first floor(fraction * P) prompt tokens
            are transformed (among themselves), the others pass unchanged.

    Each block gets a ``tcpa`` module (:class:`TCPAPrompts`) with keys ``keys_cls [Pc, C]``, ``keys_img [Pi, C]``
    and prompts ``prompts_cls [Pc, Lc, C]``, ``prompts_img [Pi, Li, C]``, initialised uniform(-1, 1) as
    published. The backbone is frozen and stays in eval mode; prompts, keys and the head train.
    """
    config = TCPAConfig(pool_size_cls=pool_size_cls, pool_size_img=pool_size_img, topk_cls=topk_cls,
                        topk_img=topk_img, prompt_len_cls=prompt_len_cls, prompt_len_img=prompt_len_img,
                        prompt_dropout=prompt_dropout, renormalize=renormalize, backend=backend,
                        prompt_dropout_per_sample=prompt_dropout_per_sample, prompt_transform=prompt_transform,
                        fourier_fraction=fourier_fraction, num_classes=num_classes)
    return attach_tcpa(model, config)


def attach_tcpa(model: nn.Module, config: TCPAConfig, block_mixin: type | None = None) -> nn.Module:
    """``apply_tcpa`` with its config made; ``block_mixin``: a block class mixin in place of the family's (the
    published dense baseline, ``dense_baseline.py``)."""
    model = _target(model)
    models = _check_model(model)
    pools = {f.name: getattr(config, f.name) for f in dataclasses.fields(PoolConfig)}
    dim, num_prefix_tokens = models.embed_dim(model), models.num_prefix_tokens(model)

    def make_prompts(i, blk):
        return {"tcpa": TCPAPrompts(dim, num_prefix_tokens=num_prefix_tokens, **pools)}

    return _attach(model, models, "tcpa", config, make_prompts, block_mixin)


def apply_vpt(model: nn.Module, *, num_prompts: int, deep: bool = True, prompt_dropout: float = 0.1,
              num_classes: int | None = None, prompt_transform: str = "none",
              fourier_fraction: float = 1.0) -> nn.Module:
    """Make ``model`` a VPT model (Jia et al. 2022) in place: the baseline TCPA is compared with.

    ``num_prompts`` prompt tokens join the sequence; with ``deep=True`` every block replaces them with its own
    (``blocks.{i}.vpt_prompts [P, C]``), else only block 0 has prompts. Prompts are queries too and each block runs
    its own forward (RoPE models: the prompts get no rotation). Initialisation: uniform(-a, a),
    a = sqrt(6 / (3*patch_area + C)), as in the VPT code. Dropout on prompts is per sample as in VPT.
    ``prompt_transform="fourier"`` makes it VFPT (Visual Fourier Prompt Tuning): each block's prompts, after
    dropout, become ``fft2(prompts).real``, only the first floor(fourier_fraction * P) of them when the fraction is
    below 1 (VFPT's "Fourier percentage").
    """
    model = _target(model)
    models = _check_model(model)
    config = VPTConfig(num_prompts=num_prompts, deep=deep, prompt_dropout=prompt_dropout, num_classes=num_classes,
                       prompt_transform=prompt_transform, fourier_fraction=fourier_fraction)
    embed_dim = models.embed_dim(model)
    bound = math.sqrt(6.0 / float(3 * models.patch_area(model) + embed_dim))

    def make_params(i, blk):
        if i > 0 and not deep:
            return {}
        return {"vpt_prompts": torch.empty(num_prompts, embed_dim).uniform_(-bound, bound)}

    return _attach(model, models, "vpt", config, make_params)


def remove_prompts(model: nn.Module) -> nn.Module:
    """Undo apply_tcpa / apply_vpt: original classes, heads (in the model's current dtype and device),
    requires_grad flags and train mode; returns ``model`` (wrappers are looked through)."""
    inner = unwrap(model)
    state = state_of(inner)
    for i, blk in enumerate([inner, *state.blocks]):
        if type(blk).__dict__.get("_prompted_base") is None:
            where = "model" if i == 0 else f"model.blocks[{i - 1}]"
            raise ValueError(f"{where}: its class was changed after the prompts were added (now "
                             f"{type(blk).__name__}, e.g. by fully_shard); remove the prompts before that")
    _detach(inner, model_family(inner), state, inner.training)
    return model


remove_tcpa = remove_prompts


# ---------------------------------------------------------------------------------------- training API


def state_of(model) -> PromptState:
    state = getattr(unwrap(model), "prompt_state", None)
    if not isinstance(state, PromptState):
        raise ValueError(f"model: expected a model patched by apply_tcpa/apply_vpt, got {type(model).__name__} "
                         "without prompts")
    return state


def _prompt_modules(model) -> list[TCPAPrompts]:
    """The TCPAPrompts modules of a TCPA model (patched or hand-written); [] for a VPT model."""
    inner = unwrap(model)
    modules = prompt_modules(inner)
    if not modules and not isinstance(getattr(inner, "prompt_state", None), PromptState):
        raise ValueError(f"model: expected a model patched by apply_tcpa/apply_vpt or holding TCPAPrompts modules, "
                         f"got {type(model).__name__} without prompts")
    return modules


def get_matching_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the matching loss of the last forward this thread ran on the model: the layers that ran in
    it (a scalar tensor on the model's device; 0 for VPT, for random selection and before any forward). For a
    hand-written model holding ``TCPAPrompts`` modules: the layers that ran since the first of them last ran."""
    inner = unwrap(model)
    state = getattr(inner, "prompt_state", None)
    if isinstance(state, PromptState):
        record = last_forward(state)
        loss = None if record is None else record.matching_loss()
        like = next(state.blocks[0].parameters())
    else:
        modules = _prompt_modules(inner)
        loss = loose_matching_loss(modules)
        like = modules[0].keys_cls
    return like.new_zeros((), dtype=torch.float32) if loss is None else loss


def set_selection(model: nn.Module, mode: str) -> nn.Module:
    """Prompt selection of every TCPAPrompts module of the model: "topk" (cosine matching) or "random" (a random
    k-subset per token, used by the published recipe for the first epochs; no matching loss then)."""
    modules = _prompt_modules(model)
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode: expected one of {SELECTION_MODES}, got {mode!r}")
    for m in modules:
        m.selection_mode = mode
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that train: prompts, keys and the classification head(s)."""
    state_of(model)
    return [p for p in unwrap(model).parameters() if p.requires_grad]
