"""Turn an existing ViT into a TCPA or VPT-deep model, in place (docs/how-it-works.md, 'Pools and prompts' and 'In a ViT
block').

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
the classification head. With ``input_prompter=True`` the patch embedding gets an ``input_prompter`` submodule (the
published image-space prompter, ``integrations/input_prompter.py``) that trains too, and a class that runs it on the
image first. ``remove_prompts(model)`` undoes everything.

A prompted model's state is its parameters and its config (``model.prompt_state``, a :class:`PromptState`; the
selection mode of each ``TCPAPrompts``, ``set_selection``). What one forward computes (every layer's prompt K/V, the
selections, the matching-loss terms) belongs to that call (``_forward.py``): ``get_matching_loss`` reads the last
forward this thread ran. Every helper here accepts the model inside DataParallel / DistributedDataParallel /
torch.compile wrappers and inside a user's module that holds it (a LightningModule's ``self.model``: ``find_model``);
every entry point checks all of its arguments before it changes anything and leaves the model as it was when it fails.
``with disable_prompts(model):`` runs the original model for a while; ``count_parameters`` /
``print_trainable_parameters`` count what trains, as PEFT does.
"""

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, overload

import torch
from torch import nn

from tcpa_kernels._forward import last_forward, loose_matching_loss
from tcpa_kernels._patch import is_fully_sharded, original_class, prompted_class, register_mixin, unwrap
from tcpa_kernels._validate import check_flag, check_int
from tcpa_kernels.integrations.family import attach_sites, detach_sites, family_of, unsupported_attentions
from tcpa_kernels.integrations.input_prompter import attach_input_prompter, detach_input_prompter, input_prompter_of
from tcpa_kernels.integrations.models import SUPPORTED, ModelFamily, model_family, refusal
from tcpa_kernels.integrations.prompt_tokens import check_prompt_options
from tcpa_kernels.integrations.prompts import SELECTION_MODES, PoolConfig, TCPAPrompts, prompt_modules


@dataclasses.dataclass
class TCPAConfig(PoolConfig):
    """A TCPA model's config: every layer's pools (:class:`PoolConfig`) and the new head; ``apply_tcpa``'s keywords
    (documented there), or ``apply_tcpa(model, config)``.

    ``backend`` is checked against the tensors each forward gets, not when the prompts are added: a model built on
    the CPU with ``backend="triton"`` runs once moved to a GPU."""

    num_classes: int | None = None
    input_prompter: bool = False

    def validate(self, model, models: ModelFamily):
        super().validate(models.num_prefix_tokens(model))
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 0)
        _check_input_prompter(self.input_prompter, model, models)


@dataclasses.dataclass
class VPTConfig:
    """A VPT model's config: ``apply_vpt``'s keywords (documented there), or ``apply_vpt(model, config)``."""

    num_prompts: int = 36
    deep: bool = True
    prompt_dropout: float = 0.1
    num_classes: int | None = None
    prompt_transform: str = "none"
    fourier_fraction: float = 1.0
    input_prompter: bool = False

    def validate(self, model, models: ModelFamily):
        check_int("num_prompts", self.num_prompts, 1)
        check_flag("deep", self.deep)
        check_prompt_options(self.prompt_dropout, self.prompt_transform, self.fourier_fraction)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 0)
        _check_input_prompter(self.input_prompter, model, models)


def _check_input_prompter(input_prompter, model, models: ModelFamily) -> None:
    """``input_prompter`` is a bool, and True only for a model whose family has a patch embedding to run it before."""
    if check_flag("input_prompter", input_prompter) and models.patch_embedding(model) is None:
        raise ValueError(f"input_prompter: expected False for a {models.name} ({type(model).__name__}), which has no "
                         "patch embedding to run the input prompter before, got True")


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
    input_site: nn.Module | None = None  # input_prompter=True: the patch embedding that holds the input prompter
    last: threading.local = dataclasses.field(default_factory=threading.local, repr=False, compare=False)
    token: object = dataclasses.field(default_factory=object, repr=False, compare=False)  # what its forwards name
    disabled: bool = dataclasses.field(default=False, repr=False, compare=False)  # inside disable_prompts
    bank_only: bool = False  # a PromptBank's backbone: its own prompt modules are unused placeholders

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
    """``model.train(mode)``: the frozen backbone stays in eval (no dropout / drop path); prompt dropout and the input
    prompter's mode follow."""

    def train(self, mode: bool = True):
        check_flag("mode", mode)
        super().train(False)
        self.training = mode
        self.prompt_state.training = mode
        for prompts in prompt_modules(self):
            prompts.training = mode
        prompter = input_prompter_of(self.prompt_state.input_site)
        if prompter is not None:  # no dropout or norm in it: only its flags follow the mode
            prompter.train(mode)
        return self


# --------------------------------------------------------------------------------------- finding the model


def _is_prompted(module: nn.Module) -> bool:
    return isinstance(module, PromptedMixin)


def _is_supported(module: nn.Module) -> bool:
    return model_family(module) is not None


def _held(model: nn.Module, found: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """(attribute path, model) of the outermost submodules of ``model`` that are, inside DataParallel /
    DistributedDataParallel / torch.compile wrappers, models ``found`` accepts."""
    held = []
    for path, module in model.named_modules():
        if path and not any(path.startswith(f"{outer}.") for outer, _ in held) and found(unwrap(module)):
            held.append((path, unwrap(module)))
    return held


def _where(held: list[tuple[str, nn.Module]]) -> str:
    """What a module holds, for an error message: 'none', 'one at .model: pass that', 'several, at .a, .b: ...'."""
    paths = ", ".join(f".{path}" for path, _ in held)
    if len(held) > 1:
        return f"several, at {paths}: pass one of them"
    return f"one at {paths}: pass that" if held else "none"


def _find(model: nn.Module, prompted: bool) -> nn.Module | None:
    """``find_model``, or None where ``model`` neither is nor holds such a model."""
    found = _is_prompted if prompted else _is_supported
    inner = unwrap(model)
    if found(inner):
        return inner
    held = _held(inner, found)
    if len(held) > 1:
        what = "model patched by apply_tcpa/apply_vpt" if prompted else "supported ViT"
        raise ValueError(f"model: expected one {what}, got {type(model).__name__}, which holds {_where(held)}")
    return held[0][1] if held else None


def find_model(model: nn.Module, *, prompted: bool = True) -> nn.Module:
    """The model to work on in ``model``: the prompted model (``prompted=True``; else a supported ViT, prompted or
    not) that ``model`` is, inside DataParallel / DistributedDataParallel / torch.compile wrappers, or else the one
    that a user's module holds among its submodules (a LightningModule's ``self.model``, a classifier wrapper; the
    outermost ones count). Every helper here finds its model this way.

    Raises ValueError naming the attributes that hold such models when there are several, or saying that none does.
    """
    check_flag("prompted", prompted)
    inner = _find(model, prompted)
    if inner is None:
        what, being = ("a model patched by apply_tcpa/apply_vpt", "has prompts: pass the model they returned") \
            if prompted else (f"a {SUPPORTED}", "is one")
        raise ValueError(f"model: expected {what}, or a module holding one, got {type(model).__name__}, and neither "
                         f"it nor any of its submodules {being}")
    return inner


# ------------------------------------------------------------------------------------------- patching


def _check_model(model) -> ModelFamily:
    """The model's family, after checking that every block can be prompted."""
    models = model_family(model)
    if models is None:
        held = _held(model, _is_supported)
        raise TypeError(f"model: expected a {SUPPORTED} (README, 'Supported models'), got "
                        f"{type(model).__module__}.{type(model).__name__}{refusal(model)}"
                        + (f"; it holds {_where(held)}" if held else ""))
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


def _config(config_class: type, config, options: dict[str, Any]):
    """An apply call's config: a copy of ``config`` (the model's state owns it), or ``config_class(**options)``."""
    fields = [f.name for f in dataclasses.fields(config_class)]
    for name, value in options.items():
        if name not in fields:
            raise TypeError(f"{name}: expected a {config_class.__name__} field ({', '.join(fields)}), got "
                            f"{name}={value!r}")
    if config is None:
        return config_class(**options)
    if not isinstance(config, config_class):
        raise TypeError(f"config: expected a {config_class.__name__}, got {type(config).__name__}")
    if options:
        raise TypeError(f"config: expected a {config_class.__name__} or keywords, not both, got config and "
                        f"{', '.join(options)}; set them in the config (dataclasses.replace(config, ...))")
    return dataclasses.replace(config)


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
    state.input_site = models.patch_embedding(model) if config.input_prompter else None
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
        if state.input_site is not None:  # last: the prompts and the head are those of a model without it
            attach_input_prompter(state.input_site, ref)
        model.prompt_state = state
        model.__class__ = prompted_class(PromptedMixin, type(model))
        model.train(training)
    except BaseException:
        _detach(model, models, state, training)
        raise
    return model


def _original_heads(model, state) -> dict[str, nn.Module]:
    """The heads the model had before the prompts, moved to the device and dtype of its current ones (the model may
    have been moved since)."""
    heads = {}
    for name, head in state.original_heads.items():
        like = next(getattr(model, name).parameters(), None)
        like = like if like is not None else _reference_param(state.blocks)
        heads[name] = head.to(device=like.device, dtype=like.dtype)
    return heads


def _detach(model, models, state, training):
    """Undo _attach, also a partial one: classes, added modules and parameters, heads, requires_grad flags, train
    mode."""
    if state.input_site is not None:
        detach_input_prompter(state.input_site)
    for blk in state.blocks:
        detach_sites(blk)
        blk._modules.pop("tcpa", None)
        blk._parameters.pop("vpt_prompts", None)
        blk.__dict__.pop("_prompt_layer", None)
        blk.__class__ = original_class(blk)
    for name, head in _original_heads(model, state).items():
        setattr(model, name, head)
    models.set_num_classes(model, state.original_num_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(name, p.requires_grad))
    model.__dict__.pop("prompt_state", None)
    model.__class__ = original_class(model)
    model.train(training)


@overload
def apply_tcpa(model: nn.Module, config: TCPAConfig) -> nn.Module: ...


@overload
def apply_tcpa(model: nn.Module, *, pool_size_cls: int = 18, pool_size_img: int = 18, topk_cls: int = 10,
               topk_img: int = 10, prompt_len_cls: int = 1, prompt_len_img: int = 1, prompt_dropout: float = 0.1,
               renormalize: bool = False, num_classes: int | None = None, backend: str = "auto",
               prompt_dropout_per_sample: bool = False, prompt_transform: str = "none",
               fourier_fraction: float = 1.0, input_prompter: bool = False) -> nn.Module: ...


def apply_tcpa(model: nn.Module, config: TCPAConfig | None = None, **options: Any) -> nn.Module:
    """Make ``model`` (a supported ViT, README "Supported models") a TCPA model in place and return it.

    The config is either ``config`` (a :class:`TCPAConfig`) or these keywords (a TCPAConfig's fields), not both:

    Args:
        pool_size_cls, pool_size_img: entries of the CLS and image prompt pools per layer (Pc, Pi; Pc+Pi <= 64).
        topk_cls, topk_img: entries each prefix / patch token selects.
        prompt_len_cls, prompt_len_img: prompt tokens per pool entry (Lc, Li).
        prompt_dropout: dropout on the prompt tokens in training (one mask shared by the batch by default).
        renormalize: False = post-softmax mask as published; True = masked softmax.
        num_classes: replace the classification head with a new one of this many classes (None: keep it).
        backend: "auto" | "triton" | "torch" for the attention and selection kernels, checked against the tensors of
            each forward (a model built on the CPU with "triton" runs once it is moved to a GPU).
        prompt_dropout_per_sample: one dropout mask per sample, as the published code (the prompt keys/values
            become [B, H, P, D] in training, B times the work of the shared [H, P, D]); default one for the batch.
        prompt_transform: "none", or "fourier" for VFPT+TCPA (the published configuration, docs/how-it-works.md,
            'Fourier prompts'): each layer's prompt tokens (CLS pool then image pool), after dropout, become
            ``fft2(prompts).real``.
        fourier_fraction: in (0, 1], VFPT's "Fourier percentage": only the first floor(fraction * P) prompt tokens
            are transformed (among themselves), the others pass unchanged.
        input_prompter: add the published recipe's trainable image-space prompter
            (:class:`~tcpa_kernels.integrations.input_prompter.InputPrompter`: x + conv(prelu(conv(x))), 3 -> 9 -> 3
            channels, 11 x 11 kernels) to the image before the patch embedding; it becomes the patch embedding's
            ``input_prompter`` submodule, trains and is saved with the prompts (the released CUB configuration).

    Each block gets a ``tcpa`` module (:class:`TCPAPrompts`) with keys ``keys_cls [Pc, C]``, ``keys_img [Pi, C]``
    and prompts ``prompts_cls [Pc, Lc, C]``, ``prompts_img [Pi, Li, C]``, initialised uniform(-1, 1) as
    published. The backbone is frozen and stays in eval mode; prompts, keys and the head train.

    Raises TypeError for a config and keywords together, a keyword that is no TCPAConfig field, or a model that is
    no supported ViT (naming the attribute that holds one, for a user's module that does).
    """
    return attach_tcpa(model, _config(TCPAConfig, config, options))


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


@overload
def apply_vpt(model: nn.Module, config: VPTConfig) -> nn.Module: ...


@overload
def apply_vpt(model: nn.Module, *, num_prompts: int, deep: bool = True, prompt_dropout: float = 0.1,
              num_classes: int | None = None, prompt_transform: str = "none",
              fourier_fraction: float = 1.0, input_prompter: bool = False) -> nn.Module: ...


def apply_vpt(model: nn.Module, config: VPTConfig | None = None, **options: Any) -> nn.Module:
    """Make ``model`` a VPT model (Jia et al. 2022) in place: the baseline TCPA is compared with.

    The config is either ``config`` (a :class:`VPTConfig`) or keywords (its fields; ``num_prompts`` required), not
    both. ``num_prompts`` prompt tokens join the sequence; with ``deep=True`` every block replaces them with its own
    (``blocks.{i}.vpt_prompts [P, C]``), else only block 0 has prompts. Prompts are queries too and each block runs
    its own forward (RoPE models: the prompts get no rotation). Initialisation: uniform(-a, a),
    a = sqrt(6 / (3*patch_area + C)), as in the VPT code. Dropout (``prompt_dropout``) on prompts is per sample as in
    VPT. ``prompt_transform="fourier"`` makes it VFPT (Visual Fourier Prompt Tuning): each block's prompts, after
    dropout, become ``fft2(prompts).real``, only the first floor(fourier_fraction * P) of them when the fraction is
    below 1 (VFPT's "Fourier percentage"). ``num_classes``: a new head of this many classes (None: keep the head).
    ``input_prompter``: the image-space prompter before the patch embedding, as for :func:`apply_tcpa`.
    """
    if config is None and "num_prompts" not in options:
        raise TypeError("num_prompts: expected the number of prompt tokens (or config=VPTConfig(...)), got none")
    config = _config(VPTConfig, config, options)
    model = _target(model)
    models = _check_model(model)
    embed_dim = models.embed_dim(model)
    bound = math.sqrt(6.0 / float(3 * models.patch_area(model) + embed_dim))

    def make_params(i, blk):
        if i > 0 and not config.deep:
            return {}
        return {"vpt_prompts": torch.empty(config.num_prompts, embed_dim).uniform_(-bound, bound)}

    return _attach(model, models, "vpt", config, make_params)


def _check_classes(model, state) -> None:
    """The model, its blocks and its patch embedding (input prompter) still have the classes the prompts gave them
    (what undoing them relies on)."""
    patched = [("model", model), *((f"model.blocks[{i}]", blk) for i, blk in enumerate(state.blocks))]
    if state.input_site is not None:
        patched.append(("the model's patch embedding", state.input_site))
    for where, module in patched:
        if type(module).__dict__.get("_prompted_base") is None:
            raise ValueError(f"{where}: its class was changed after the prompts were added (now "
                             f"{type(module).__name__}, e.g. by fully_shard); remove the prompts before that")


def remove_prompts(model: nn.Module) -> nn.Module:
    """Undo apply_tcpa / apply_vpt: original classes, heads (in the model's current dtype and device),
    requires_grad flags and train mode; returns ``model`` (the prompted model is found as ``find_model`` does)."""
    inner = find_model(model)
    state = state_of(inner)
    _check_classes(inner, state)
    _detach(inner, model_family(inner), state, inner.training)
    return model


remove_tcpa = remove_prompts


@contextlib.contextmanager
def disable_prompts(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_prompts(model):`` the model runs as it would without the prompts: its blocks' and attentions'
    own forwards and its original classification heads, giving what ``remove_prompts(model)`` would make it give
    (bit for bit); on exit, also when the body raises, the prompts are back. Yields ``model``.

    Nothing is copied or removed: the prompted blocks, attention modules and norms (and the patch embedding of an
    ``input_prompter`` model) get their original classes for the while, as ``remove_prompts`` gives them, and the
    original heads (a ``num_classes`` model) take the new heads' places; outside the context this costs nothing.
    Meanwhile:

    - the model runs without prompts in every thread; do not copy, save, move or re-wrap it;
    - ``trainable_parameters``, ``count_parameters``, ``save_prompts``, ``remove_prompts`` refuse it (its heads are
      the original ones); ``get_matching_loss`` still reads the last forward that ran with prompts;
    - the backbone stays in eval mode, and a classification model's class count (timm ``num_classes``, Hugging Face
      ``config.num_labels``) stays the new head's: call a Hugging Face model without ``labels``;
    - a ``torch.compile``d model compiles once more for the model without prompts (its guards see the classes
      change), and then reuses each graph.

    A nested ``disable_prompts`` of the same model does nothing more.
    """
    inner = find_model(model)
    state = inner.prompt_state
    if state.disabled:
        yield model
        return
    _check_classes(inner, state)
    patched = [m for blk in state.blocks for m in blk.modules()]
    if state.input_site is not None:
        patched.append(state.input_site)
    swapped = [(m, type(m)) for m in patched if "_prompted_base" in type(m).__dict__]
    heads = {name: getattr(inner, name) for name in state.original_heads}
    state.disabled = True
    try:
        for name, head in _original_heads(inner, state).items():
            setattr(inner, name, head)
        for module, _ in swapped:
            module.__class__ = original_class(module)
        yield model
    finally:
        for module, prompted in swapped:
            module.__class__ = prompted
        for name, head in heads.items():
            setattr(inner, name, head)
        state.disabled = False


# ---------------------------------------------------------------------------------------- training API


def state_of(model: nn.Module) -> PromptState:
    """The :class:`PromptState` of the prompted model ``model`` is or holds (``find_model``); ValueError inside
    ``disable_prompts``, where the model is not its prompted self."""
    state = find_model(model).prompt_state
    if state.disabled:
        raise ValueError(f"model: expected a model with its prompts enabled, got {type(model).__name__} inside "
                         "`with disable_prompts(model)`; call this after the with block")
    return state


def _prompt_modules(model) -> list[TCPAPrompts]:
    """The TCPAPrompts modules of a TCPA model (patched, or hand-written: ``model`` and its submodules); [] for a VPT
    model."""
    inner = _find(model, prompted=True)
    modules = prompt_modules(unwrap(model) if inner is None else inner)
    if not modules and inner is None:
        raise ValueError(f"model: expected a model patched by apply_tcpa/apply_vpt or holding TCPAPrompts modules, "
                         f"got {type(model).__name__} without prompts")
    return modules


def get_matching_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the matching loss of the last forward this thread ran on the model: the layers that ran in
    it (a scalar tensor on the model's device; 0 for VPT, for random selection and before any forward). For a
    hand-written model holding ``TCPAPrompts`` modules: the layers that ran since the first of them last ran."""
    inner = _find(model, prompted=True)
    if inner is not None:
        state = inner.prompt_state
        record = last_forward(state)
        loss = None if record is None else record.matching_loss()
        if loss is None:  # the zero on the model's device (no parameter walk on the common path)
            loss = next(state.blocks[0].parameters()).new_zeros((), dtype=torch.float32)
        return loss
    modules = _prompt_modules(model)
    loss = loose_matching_loss(modules)
    return modules[0].keys_cls.new_zeros((), dtype=torch.float32) if loss is None else loss


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
    """Parameters that train: prompts, keys, the input prompter (``input_prompter=True``) and the classification
    head(s) of the prompted model ``model`` is or holds (``find_model``)."""
    inner = find_model(model)
    state_of(inner)
    return [p for p in inner.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the prompted model ``model`` is or holds (``find_model``), each
    shared parameter counted once."""
    inner = find_model(model)
    state_of(inner)
    params = list(inner.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts of ``count_parameters`` as PEFT's ``print_trainable_parameters`` does:
    ``trainable params: 41,957 || all params: 5,758,253 || trainable%: 0.7287``."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
