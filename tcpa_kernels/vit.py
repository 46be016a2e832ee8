"""Turn an existing timm VisionTransformer into a TCPA or VPT-deep model, in place (TCPA_SPEC.md §1, §4).

Each block keeps its own modules (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.proj``,
``ls1``, ``drop_path1``, MLP) and gets its prompt parameters next to them (``blocks.{i}.tcpa_keys_cls`` ...), so
every original ``state_dict`` key stays. Blocks and model change class to generated subclasses of their own
(``_patch.py``): a prompted model pickles, deep-copies and saves like any module. The backbone is frozen and kept in
eval mode; the trainable parameters are the prompts, the keys and the classification head.
``remove_prompts(model)`` undoes everything.

Runtime state lives in ``model.prompt_state`` (a :class:`PromptState`): the selection mode
(``set_selection``), the matching loss of the last forward (``get_matching_loss``) and the config. Every entry
point here accepts the model inside DataParallel / DistributedDataParallel / torch.compile wrappers, checks all of
its arguments before it changes anything, and leaves the model as it was when it fails.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._patch import is_fully_sharded, original_class, prompted_class, register_mixin, unwrap
from tcpa_kernels._prompt_kv import own_prompt_kv, own_prompts, step_prompt_kv, step_prompts
from tcpa_kernels._validate import check_flag, check_int, check_number, check_pool_config
from tcpa_kernels.ops._function import topk_bits_op
from tcpa_kernels.ops.match_prompts import match_scores, matching_loss
from tcpa_kernels.ops.match_select import match_select, norm_match_select
from tcpa_kernels.ops.packed import tcpa_packed_attention
from tcpa_kernels.ops.selection import Selection

SELECTION_MODES = ("topk", "random")
ATTENTION_MODES = ("fused", "dense")
TCPA_PARAMS = ("tcpa_keys_cls", "tcpa_keys_img", "tcpa_prompts_cls", "tcpa_prompts_img")
VPT_PARAMS = ("vpt_prompts",)
HEADS = ("head", "head_dist")


@dataclasses.dataclass
class TCPAConfig:
    pool_size_cls: int = 18
    pool_size_img: int = 18
    topk_cls: int = 10
    topk_img: int = 10
    prompt_len_cls: int = 1
    prompt_len_img: int = 1
    prompt_dropout: float = 0.1
    renormalize: bool = False
    num_classes: int | None = None
    backend: str = "auto"
    attention: str = "fused"

    @property
    def num_prompts(self):
        return self.pool_size_cls * self.prompt_len_cls + self.pool_size_img * self.prompt_len_img

    def validate(self, model):
        for name in ("pool_size_cls", "pool_size_img"):
            check_int(name, getattr(self, name), 1)
        check_pool_config("", self.pool_size_cls, self.pool_size_img, self.topk_cls, self.topk_img,
                          self.prompt_len_cls, self.prompt_len_img, model.num_prefix_tokens, model.num_prefix_tokens)
        _check_common(self)
        check_flag("renormalize", self.renormalize)
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {self.attention!r}")
        resolve_backend(self.backend, next(model.parameters()).device)


@dataclasses.dataclass
class VPTConfig:
    num_prompts: int = 36
    deep: bool = True
    prompt_dropout: float = 0.1
    num_classes: int | None = None

    def validate(self, model):
        check_int("num_prompts", self.num_prompts, 1)
        check_flag("deep", self.deep)
        _check_common(self)


def _check_common(config):
    check_number("prompt_dropout", config.prompt_dropout, lo=0.0, hi=1.0)
    if config.num_classes is not None:
        check_int("num_classes", config.num_classes, 0)


def _runtime(default=None, factory=None):
    """A PromptState field that lives for one forward or is a cache: not pickled, not deep-copied."""
    kind = dict(default_factory=factory) if factory is not None else dict(default=default)
    return dataclasses.field(metadata={"runtime": True}, **kind)


@dataclasses.dataclass
class PromptState:
    """Runtime state of a prompted model (``model.prompt_state``); not a module, holds no parameters.

    Between forwards it keeps only the matching-loss terms of the last forward (what ``get_matching_loss``
    needs) and caches; pickling and ``copy.deepcopy`` drop both (the next forward rebuilds them).
    """

    method: str  # "tcpa" | "vpt"
    config: TCPAConfig | VPTConfig
    num_prefix_tokens: int
    selection: str = "topk"
    training: bool = False
    blocks: list = dataclasses.field(default_factory=list)  # the prompted blocks, in order
    original_heads: dict = dataclasses.field(default_factory=dict)
    original_num_classes: int = 0
    original_requires_grad: dict = dataclasses.field(default_factory=dict)
    layer_terms: dict = _runtime(factory=dict)  # layer -> matching-loss terms of the last forward
    step_inputs: list | None = _runtime()  # per layer: prompt K/V [2, H, P, D] (fused) or tokens [P, C]; None: own
    carry: dict = _runtime(factory=dict)  # VPT-shallow: layer -> its prompt tokens' output, the next layer's prompts
    kv: list = _runtime(factory=list)  # prompt K/V kept without autograd ...
    kv_key: tuple | None = _runtime()  # ... while these parameters are unchanged
    weights: tuple = _runtime(default=())  # folded prompt-K/V weights of a frozen backbone ...
    weights_key: tuple | None = _runtime()  # ... while these parameters are unchanged

    def __getstate__(self):
        runtime = {f.name for f in dataclasses.fields(self) if f.metadata.get("runtime")}
        return {name: value for name, value in self.__dict__.items() if name not in runtime}

    def __setstate__(self, state):
        self.__dict__.update(state)
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime"):
                setattr(self, f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)

    @property
    def matching_loss(self):
        """Sum over layers of the matching loss of the last forward (0 for VPT or random selection)."""
        if not self.layer_terms:
            return torch.zeros(())
        return torch.cat([terms.flatten() for terms in self.layer_terms.values()]).sum()


@dataclasses.dataclass
class _LayerRef:
    state: PromptState
    index: int
    is_last: bool


# ----------------------------------------------------------------------------------------------- blocks


def _project_qkv(attn, h):
    """timm Attention's projections: h [B, S, C] -> q, k, v [B, H, S, D] (q_norm/k_norm applied)."""
    B, S, _ = h.shape
    qkv = attn.qkv(h).reshape(B, S, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _finish_attention(attn, out, h):
    """timm Attention after the softmax: out [B, N, C] -> [B, N, C] through norm, gate, proj."""
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _reject_attn_mask(attn_mask, is_causal):
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal: prompted blocks do not take an attention mask, got "
                         f"attn_mask={None if attn_mask is None else tuple(attn_mask.shape)}, is_causal={is_causal}")


def _fused_attention(blk, h, selection, prompt_kv, cfg):
    """TCPA attention through the fused op, on the packed qkv projection. h [B, N, C], prompt_kv [2, H, P, D]
    -> [B, N, C]: no layout copy on either side of the op."""
    attn = blk.attn
    B, N, _ = h.shape
    qkv = attn.qkv(h).view(B, N, 3, attn.num_heads, attn.head_dim)  # [B, N, 3, H, D]
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        # qk_norm: a LayerNorm over D, the same on [B, N, H, D] as on timm's [B, H, N, D]; one restacking copy
        qkv = torch.stack([attn.q_norm(qkv[:, :, 0]).to(qkv.dtype), attn.k_norm(qkv[:, :, 1]).to(qkv.dtype),
                           qkv[:, :, 2]], dim=2)
    return tcpa_packed_attention(qkv, prompt_kv, selection, scale=attn.scale, renormalize=cfg.renormalize,
                                 backend=resolve_backend(cfg.backend, h.device))


def _dense_attention(blk, h, selection, prompts, cfg):
    """Official-style TCPA, the baseline the fused op is measured against: prompts concatenated into the
    sequence, eager softmax over [P+N] x [P+N], a dense float mask [B, H, P+N, P+N] multiplied after it (or
    -inf before it when renormalize). Returns the output of the N real tokens [B, N, C]."""
    B, N, _ = h.shape
    P = prompts.shape[0]
    seq = torch.cat([blk.norm1(prompts)[None].expand(B, -1, -1).to(h.dtype), h], dim=1)  # [B, P+N, C]
    q, k, v = _project_qkv(blk.attn, seq)  # [B, H, P+N, D]
    scores_qk = (q * blk.attn.scale) @ k.transpose(-1, -2)  # [B, H, P+N, P+N]
    dense_mask = torch.ones(B, blk.attn.num_heads, P + N, P + N, dtype=scores_qk.dtype, device=h.device)
    dense_mask[:, :, P:, :P] = selection.rows(0, N, P)[:, None].to(dense_mask.dtype)
    if cfg.renormalize:
        probs = scores_qk.masked_fill(dense_mask == 0, float("-inf")).softmax(-1)
    else:
        probs = scores_qk.softmax(-1) * dense_mask
    return (probs @ v)[:, :, P:].transpose(1, 2).reshape(B, N, -1)


def _norm_and_select(blk, x, state, cfg):
    """(norm1(x) [B, N, C], selection words [B, N], matching-loss terms [B, N] or None) of the block input x."""
    B, N, _ = x.shape
    backend = resolve_backend(cfg.backend, x.device)
    n_pre, pool_cls = state.num_prefix_tokens, cfg.pool_size_cls
    if state.selection == "random":  # a random k-subset per token, no matching loss
        scores = torch.rand(B, N, pool_cls + cfg.pool_size_img, device=x.device)
        return blk.norm1(x), topk_bits_op(scores, n_pre, pool_cls, cfg.topk_cls, cfg.topk_img, backend), None
    if cfg.attention == "dense":  # the published code's matching: a scores tensor, top-k, loss from it
        scores = match_scores(x, blk.tcpa_keys_cls, blk.tcpa_keys_img)  # [B, N, Pc+Pi]
        bits = topk_bits_op(scores.detach(), n_pre, pool_cls, cfg.topk_cls, cfg.topk_img, backend)
        return blk.norm1(x), bits, matching_loss(scores, bits, n_pre, cfg.topk_cls, cfg.topk_img)[None]
    if _fusable(blk.norm1):  # one kernel reads x for both (and one writes dx for both)
        return norm_match_select(x, blk.norm1, blk.tcpa_keys_cls, blk.tcpa_keys_img, topk_cls=cfg.topk_cls,
                                 topk_img=cfg.topk_img, num_prefix_tokens=n_pre, backend=backend)
    bits, terms = match_select(x, blk.tcpa_keys_cls, blk.tcpa_keys_img, topk_cls=cfg.topk_cls, topk_img=cfg.topk_img,
                               num_prefix_tokens=n_pre, backend=backend)
    return blk.norm1(x), bits, terms


def _fusable(norm):
    """A LayerNorm over the last dim whose parameters are frozen: the matching kernels can apply it."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
            and not any(p.requires_grad for p in norm.parameters()))



@register_mixin
class TCPAMixin:
    """Pre-norm block with TCPA attention (TCPA_SPEC.md §4). x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        _reject_attn_mask(attn_mask, is_causal)
        layer = self._prompt_layer
        state, cfg = layer.state, layer.state.config
        if layer.index == 0:  # parameter-only work of every layer, once per forward (None: each layer its own)
            state.step_inputs = step_prompt_kv(state) if cfg.attention == "fused" else step_prompts(state)
            state.layer_terms = {}
        if state.step_inputs is not None:
            prompt_input = state.step_inputs[layer.index]
        else:
            prompt_input = (own_prompt_kv if cfg.attention == "fused" else own_prompts)(state, self)
        h, bits, terms = _norm_and_select(self, x, state, cfg)
        if terms is not None:
            state.layer_terms[layer.index] = terms
        selection = Selection(bits=bits, pool_cls=cfg.pool_size_cls, len_cls=cfg.prompt_len_cls,
                              len_img=cfg.prompt_len_img)
        attention = _fused_attention if cfg.attention == "fused" else _dense_attention
        out = attention(self, h, selection, prompt_input, cfg)  # [B, N, C]
        x = x + self.drop_path1(self.ls1(_finish_attention(self.attn, out, h)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register_mixin
class VPTMixin:
    """VPT: prompts are ordinary tokens (queries too) for the block's own forward. x [B, N, C] -> [B, N, C].

    The prompts go after the N real tokens (attention has no positions, so this is the published model) and the
    block returns the real tokens only: features taken between blocks (``forward_intermediates``) hold no prompts.
    Deep blocks bring their own prompts; without deep prompts the prompt tokens' output passes to the next block
    through ``prompt_state.carry`` (per layer, so a checkpointed block recomputes with the prompts it had).
    """

    def forward(self, x, attn_mask=None, is_causal=False):
        _reject_attn_mask(attn_mask, is_causal)
        layer = self._prompt_layer
        state, cfg = layer.state, layer.state.config
        N = x.shape[1]
        if "vpt_prompts" in self._parameters:
            prompts = self.vpt_prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, C]
            prompts = F.dropout(prompts, cfg.prompt_dropout, training=state.training)
        else:
            prompts = state.carry[layer.index - 1]
        x = super().forward(torch.cat([x, prompts], dim=1))  # [B, N+P, C], the block's timm Attention (SDPA)
        if not (cfg.deep or layer.is_last):
            state.carry[layer.index] = x[:, N:]
        return x[:, :N]


@register_mixin
class PromptedMixin:
    """``model.train(mode)``: the frozen backbone stays in eval (no dropout / drop path); prompt dropout follows."""

    def train(self, mode: bool = True):
        check_flag("mode", mode)
        super().train(False)
        self.training = mode
        self.prompt_state.training = mode
        return self


# ------------------------------------------------------------------------------------------- patching


def _check_model(model):
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer (ViT, DeiT, ...), got {type(model).__name__}")
    if hasattr(model, "prompt_state"):
        raise ValueError(f"model: already has {model.prompt_state.method} prompts; call remove_prompts(model) first")
    if any(is_fully_sharded(m) for m in model.modules()):
        raise ValueError("model: fully_shard (FSDP2) was already applied; add prompts first, then shard, so the "
                         "prompt parameters are sharded with the rest")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or not isinstance(getattr(blk, "attn", None), Attention):
            raise TypeError(
                f"model.blocks[{i}]: can patch only pre-norm timm Block with fused-qkv timm Attention, got "
                f"{type(blk).__name__} (attn: {type(getattr(blk, 'attn', None)).__name__})")


def _target(model):
    """The model to patch: torch.compile's wrapper is looked through; data-parallel wrappers are refused because
    they registered the parameters already."""
    inner = unwrap(model)
    if inner is not model and not hasattr(model, "_orig_mod"):
        raise ValueError(f"model: add prompts before wrapping the model in {type(model).__name__} (the wrapper has "
                         "registered its parameters already)")
    return inner


def _reference_param(model):
    """A backbone parameter: the device and dtype new prompts and heads get."""
    param = next(model.patch_embed.parameters(), None)
    return param if param is not None else next(model.parameters())


def _attach(model, method, config, make_params):
    """Freeze the backbone, add per-block parameters from make_params(i, block), swap classes, reset the head.
    Nothing is changed before every argument is checked; a failure on the way undoes what was done."""
    config.validate(model)
    ref = _reference_param(model)
    state = PromptState(method=method, config=config, num_prefix_tokens=model.num_prefix_tokens,
                        blocks=list(model.blocks), original_num_classes=model.num_classes)
    state.original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state.original_heads = {name: getattr(model, name) for name in HEADS
                            if isinstance(getattr(model, name, None), nn.Module)}
    new_params = [{name: nn.Parameter(value.to(device=ref.device, dtype=ref.dtype))
                   for name, value in make_params(i, blk).items()} for i, blk in enumerate(model.blocks)]
    mixin = TCPAMixin if method == "tcpa" else VPTMixin
    training = model.training
    try:
        model.requires_grad_(False)
        for i, (blk, params) in enumerate(zip(model.blocks, new_params)):
            for name, param in params.items():
                blk.register_parameter(name, param)
            blk._prompt_layer = _LayerRef(state, i, i == len(model.blocks) - 1)
            blk.__class__ = prompted_class(mixin, type(blk))
        if config.num_classes is not None:
            model.reset_classifier(config.num_classes)
        for name in state.original_heads:
            getattr(model, name).to(device=ref.device, dtype=ref.dtype).requires_grad_(True)
        model.prompt_state = state
        model.__class__ = prompted_class(PromptedMixin, type(model))
        model.train(training)
    except BaseException:
        _detach(model, state, training)
        raise
    return model


def _detach(model, state, training):
    """Undo _attach, also a partial one: classes, parameters, heads, requires_grad flags, train mode."""
    for blk in state.blocks:
        for name in (*TCPA_PARAMS, *VPT_PARAMS):
            blk._parameters.pop(name, None)
        blk.__dict__.pop("_prompt_layer", None)
        blk.__class__ = original_class(blk)
    current = {name: getattr(model, name) for name in state.original_heads}
    for name, head in state.original_heads.items():  # in the dtype/device the model was moved to meanwhile
        like = next(current[name].parameters(), None)
        like = like if like is not None else _reference_param(model)
        setattr(model, name, head.to(device=like.device, dtype=like.dtype))
    model.num_classes = state.original_num_classes
    for name, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(name, p.requires_grad))
    model.__dict__.pop("prompt_state", None)
    model.__class__ = original_class(model)
    model.train(training)


def apply_tcpa(model: VisionTransformer, *, pool_size_cls: int = 18, pool_size_img: int = 18, topk_cls: int = 10,
               topk_img: int = 10, prompt_len_cls: int = 1, prompt_len_img: int = 1, prompt_dropout: float = 0.1,
               renormalize: bool = False, num_classes: int | None = None, backend: str = "auto",
               attention: str = "fused") -> VisionTransformer:
    """Make ``model`` (a timm VisionTransformer) a TCPA model in place and return it.

    Args:
        pool_size_cls, pool_size_img: entries of the CLS and image prompt pools per layer (Pc, Pi; Pc+Pi <= 64).
        topk_cls, topk_img: entries each prefix / patch token selects.
        prompt_len_cls, prompt_len_img: prompt tokens per pool entry (Lc, Li).
        prompt_dropout: dropout on the prompt tokens in training (one mask shared by the batch).
        renormalize: False = post-softmax mask as published; True = masked softmax.
        num_classes: replace the classification head with a new one of this many classes (None: keep it).
        backend: "auto" | "triton" | "torch" for the attention and selection kernels.
        attention: "fused" (this library's op) or "dense" (the published implementation's dense
            [B, H, P+N, P+N] mask, kept as the comparison baseline for benchmarks; same math).

    Each block gets keys ``tcpa_keys_cls [Pc, C]``, ``tcpa_keys_img [Pi, C]`` and prompts
    ``tcpa_prompts_cls [Pc, Lc, C]``, ``tcpa_prompts_img [Pi, Li, C]``, initialised uniform(-1, 1) as
    published. The backbone is frozen and stays in eval mode; prompts, keys and the head train.
    """
    model = _target(model)
    _check_model(model)
    config = TCPAConfig(pool_size_cls, pool_size_img, topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                        prompt_dropout, renormalize, num_classes, backend, attention)
    C = model.embed_dim

    def make_params(i, blk):
        shapes = dict(tcpa_keys_cls=(pool_size_cls, C), tcpa_keys_img=(pool_size_img, C),
                      tcpa_prompts_cls=(pool_size_cls, prompt_len_cls, C),
                      tcpa_prompts_img=(pool_size_img, prompt_len_img, C))
        return {name: torch.empty(shape).uniform_(-1.0, 1.0) for name, shape in shapes.items()}

    return _attach(model, "tcpa", config, make_params)


def apply_vpt(model: VisionTransformer, *, num_prompts: int, deep: bool = True, prompt_dropout: float = 0.1,
              num_classes: int | None = None) -> VisionTransformer:
    """Make ``model`` a VPT model (Jia et al. 2022) in place: the baseline TCPA is compared with.

    ``num_prompts`` prompt tokens join the sequence; with ``deep=True`` every block replaces them with its own
    (``blocks.{i}.vpt_prompts [P, C]``), else only block 0 has prompts. Prompts are queries too and attention is
    the block's own timm Attention (SDPA). Initialisation: uniform(-a, a), a = sqrt(6 / (3*patch_area + C)), as
    in the VPT code. Dropout on prompts is per sample as in VPT.
    """
    model = _target(model)
    _check_model(model)
    config = VPTConfig(num_prompts, deep, prompt_dropout, num_classes)
    patch_area = math.prod(model.patch_embed.patch_size)
    bound = math.sqrt(6.0 / float(3 * patch_area + model.embed_dim))

    def make_params(i, blk):
        if i > 0 and not deep:
            return {}
        return {"vpt_prompts": torch.empty(num_prompts, model.embed_dim).uniform_(-bound, bound)}

    return _attach(model, "vpt", config, make_params)


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
    _detach(inner, state, inner.training)
    return model


remove_tcpa = remove_prompts


# ---------------------------------------------------------------------------------------- training API


def state_of(model) -> PromptState:
    state = getattr(unwrap(model), "prompt_state", None)
    if not isinstance(state, PromptState):
        raise ValueError(f"model: expected a model patched by apply_tcpa/apply_vpt, got {type(model).__name__} "
                         "without prompts")
    return state


def get_matching_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the matching loss of the last forward (a scalar tensor; 0 for VPT / random)."""
    return state_of(model).matching_loss


def set_selection(model: nn.Module, mode: str) -> nn.Module:
    """Prompt selection of a TCPA model: "topk" (cosine matching) or "random" (a random k-subset per token,
    used by the published recipe for the first epochs; no matching loss then)."""
    state = state_of(model)
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode: expected one of {SELECTION_MODES}, got {mode!r}")
    state.selection = mode
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that train: prompts, keys and the classification head(s)."""
    state_of(model)
    return [p for p in unwrap(model).parameters() if p.requires_grad]
