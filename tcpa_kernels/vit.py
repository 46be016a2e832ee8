"""Turn an existing timm VisionTransformer into a TCPA or VPT-deep model, in place (TCPA_SPEC.md §1, §4).

Each block keeps its own modules (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.proj``,
``ls1``, ``drop_path1``, MLP): the patch replaces ``block.forward`` on the instance and adds the block's
prompt parameters next to them (``blocks.{i}.tcpa_keys_cls`` ...), so every original ``state_dict`` key
stays. The backbone is frozen and kept in eval mode; the trainable parameters are the prompts, the keys
and the classification head. ``remove_prompts(model)`` undoes everything.

Runtime state lives in ``model.prompt_state`` (a :class:`PromptState`): the selection mode
(``set_selection``), the matching loss of the last forward (``get_matching_loss``) and the config.
"""

import dataclasses
import json
import math
import types

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._prompt_kv import layer_prompts, step_prompt_kv
from tcpa_kernels._validate import check_pool_config
from tcpa_kernels.ops._function import topk_bits_op
from tcpa_kernels.ops.match_prompts import match_scores, matching_loss
from tcpa_kernels.ops.match_select import match_select, norm_match_select
from tcpa_kernels.ops.packed import tcpa_packed_attention
from tcpa_kernels.ops.selection import Selection

SELECTION_MODES = ("topk", "random")
TCPA_PARAMS = ("tcpa_keys_cls", "tcpa_keys_img", "tcpa_prompts_cls", "tcpa_prompts_img")
VPT_PARAMS = ("vpt_prompts",)


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


@dataclasses.dataclass
class VPTConfig:
    num_prompts: int = 36
    deep: bool = True
    prompt_dropout: float = 0.1
    num_classes: int | None = None


@dataclasses.dataclass
class PromptState:
    """Runtime state of a prompted model (``model.prompt_state``); not a module, holds no parameters."""

    method: str  # "tcpa" | "vpt"
    config: TCPAConfig | VPTConfig
    num_prefix_tokens: int
    selection: str = "topk"
    training: bool = False
    layer_terms: dict = dataclasses.field(default_factory=dict)  # layer -> matching-loss terms of the last forward
    blocks: list = dataclasses.field(default_factory=list)  # the prompted blocks, in order
    step_inputs: list | tuple = ()  # per layer, this forward: prompt K/V [2, H, P, D] (fused) or tokens [P, C]
    kv: list = dataclasses.field(default_factory=list)  # prompt K/V kept without autograd ...
    kv_key: tuple | None = None  # ... while these parameters are unchanged
    weights: tuple = ()  # folded prompt-K/V weights of a frozen backbone ...
    weights_key: tuple | None = None  # ... while these parameters are unchanged
    original_heads: dict = dataclasses.field(default_factory=dict)
    original_num_classes: int = 0
    original_requires_grad: dict = dataclasses.field(default_factory=dict)

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


def _tcpa_block_forward(self, x, attn_mask=None, is_causal=False):
    """Pre-norm block with TCPA attention (TCPA_SPEC.md §4). x [B, N, C] -> [B, N, C]."""
    _reject_attn_mask(attn_mask, is_causal)
    layer = self._prompt_layer
    state, cfg = layer.state, layer.state.config
    if layer.index == 0:  # parameter-only work of every layer, once per forward
        state.step_inputs = step_prompt_kv(state) if cfg.attention == "fused" else layer_prompts(state).unbind(0)
        state.layer_terms = {}
    h, bits, terms = _norm_and_select(self, x, state, cfg)
    if terms is not None:
        state.layer_terms[layer.index] = terms
    selection = Selection(bits=bits, pool_cls=cfg.pool_size_cls, len_cls=cfg.prompt_len_cls,
                          len_img=cfg.prompt_len_img)
    attention = _fused_attention if cfg.attention == "fused" else _dense_attention
    out = attention(self, h, selection, state.step_inputs[layer.index], cfg)  # [B, N, C]
    x = x + self.drop_path1(self.ls1(_finish_attention(self.attn, out, h)))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _vpt_block_forward(self, x, attn_mask=None, is_causal=False):
    """VPT: prompts sit after the prefix tokens as ordinary tokens (queries too), the block is unchanged.

    Block 0 inserts them, deep blocks replace them with their own, the last block strips them again.
    """
    _reject_attn_mask(attn_mask, is_causal)
    layer = self._prompt_layer
    state, cfg = layer.state, layer.state.config
    n_pre, P = state.num_prefix_tokens, cfg.num_prompts
    if hasattr(self, "vpt_prompts"):
        prompts = self.vpt_prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, C]
        prompts = F.dropout(prompts, cfg.prompt_dropout, training=state.training)
        rest = x[:, n_pre:] if layer.index == 0 else x[:, n_pre + P:]
        x = torch.cat([x[:, :n_pre], prompts, rest], dim=1)
    x = type(self).forward(self, x)  # the block's own forward: timm Attention (SDPA) over N+P tokens
    if layer.is_last:
        x = torch.cat([x[:, :n_pre], x[:, n_pre + P:]], dim=1)
    return x


def _train_keep_backbone_eval(self, mode=True):
    """model.train(mode): the frozen backbone stays in eval (no dropout / drop path); prompt dropout follows mode."""
    nn.Module.train(self, False)
    self.training = mode
    self.prompt_state.training = mode
    return self


# ------------------------------------------------------------------------------------------- patching


def _check_model(model):
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer (ViT, DeiT, ...), got {type(model).__name__}")
    if hasattr(model, "prompt_state"):
        raise ValueError(f"model: already has {model.prompt_state.method} prompts; call remove_prompts(model) first")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or not isinstance(getattr(blk, "attn", None), Attention):
            raise TypeError(
                f"model.blocks[{i}]: can patch only pre-norm timm Block with fused-qkv timm Attention, got "
                f"{type(blk).__name__} (attn: {type(getattr(blk, 'attn', None)).__name__})")


def _attach(model, method, config, make_params):
    """Freeze the backbone, add per-block parameters from make_params(i, block), patch forwards and head."""
    state = PromptState(method=method, config=config, num_prefix_tokens=model.num_prefix_tokens,
                        blocks=list(model.blocks))
    state.original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    forward = _tcpa_block_forward if method == "tcpa" else _vpt_block_forward
    depth = len(model.blocks)
    ref = next(model.parameters())
    for i, blk in enumerate(model.blocks):
        for name, value in make_params(i, blk).items():
            blk.register_parameter(name, nn.Parameter(value.to(device=ref.device, dtype=ref.dtype)))
        blk._prompt_layer = _LayerRef(state, i, i == depth - 1)
        blk.forward = types.MethodType(forward, blk)
    heads = [name for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Module)]
    state.original_heads = {name: getattr(model, name) for name in heads}
    state.original_num_classes = model.num_classes
    if config.num_classes is not None:
        model.reset_classifier(config.num_classes)
    for name in heads:
        getattr(model, name).to(device=ref.device, dtype=ref.dtype).requires_grad_(True)
    model.prompt_state = state
    model.train = types.MethodType(_train_keep_backbone_eval, model)
    model.train(model.training)
    return model


def apply_tcpa(model, *, pool_size_cls=18, pool_size_img=18, topk_cls=10, topk_img=10, prompt_len_cls=1,
               prompt_len_img=1, prompt_dropout=0.1, renormalize=False, num_classes=None, backend="auto",
               attention="fused"):
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
    config = TCPAConfig(pool_size_cls, pool_size_img, topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                        float(prompt_dropout), bool(renormalize), num_classes, backend, attention)
    _check_model(model)
    if attention not in ("fused", "dense"):
        raise ValueError(f"attention: expected 'fused' or 'dense', got {attention!r}")
    resolve_backend(backend, next(model.parameters()).device)
    for name, value in (("pool_size_cls", pool_size_cls), ("pool_size_img", pool_size_img)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    check_pool_config("", pool_size_cls, pool_size_img, topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                      model.num_prefix_tokens, model.num_prefix_tokens)
    if not 0.0 <= config.prompt_dropout < 1.0:
        raise ValueError(f"prompt_dropout: expected a float in [0, 1), got {prompt_dropout!r}")
    C = model.embed_dim

    def make_params(i, blk):
        shapes = dict(tcpa_keys_cls=(pool_size_cls, C), tcpa_keys_img=(pool_size_img, C),
                      tcpa_prompts_cls=(pool_size_cls, prompt_len_cls, C),
                      tcpa_prompts_img=(pool_size_img, prompt_len_img, C))
        return {name: torch.empty(shape).uniform_(-1.0, 1.0) for name, shape in shapes.items()}

    return _attach(model, "tcpa", config, make_params)


def apply_vpt(model, *, num_prompts, deep=True, prompt_dropout=0.1, num_classes=None):
    """Make ``model`` a VPT model (Jia et al. 2022) in place: the baseline TCPA is compared with.

    ``num_prompts`` prompt tokens are inserted after the prefix tokens; with ``deep=True`` every block
    replaces them with its own (``blocks.{i}.vpt_prompts [P, C]``), else only block 0 has prompts. Prompts are
    queries too and attention is the block's own timm Attention (SDPA). Initialisation: uniform(-a, a),
    a = sqrt(6 / (3*patch_area + C)), as in the VPT code. Dropout on prompts is per sample as in VPT.
    """
    _check_model(model)
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts: expected an int >= 1, got {num_prompts!r}")
    if not 0.0 <= float(prompt_dropout) < 1.0:
        raise ValueError(f"prompt_dropout: expected a float in [0, 1), got {prompt_dropout!r}")
    config = VPTConfig(num_prompts, bool(deep), float(prompt_dropout), num_classes)
    patch_area = math.prod(model.patch_embed.patch_size)
    bound = math.sqrt(6.0 / float(3 * patch_area + model.embed_dim))

    def make_params(i, blk):
        if i > 0 and not deep:
            return {}
        return {"vpt_prompts": torch.empty(num_prompts, model.embed_dim).uniform_(-bound, bound)}

    return _attach(model, "vpt", config, make_params)


def remove_prompts(model):
    """Undo apply_tcpa / apply_vpt: original forwards, heads, requires_grad flags and train(); returns model."""
    state = _state(model)
    for blk in model.blocks:
        for name in (*TCPA_PARAMS, *VPT_PARAMS):
            if name in blk._parameters:
                del blk._parameters[name]
        del blk.forward, blk._prompt_layer
    for name, head in state.original_heads.items():
        setattr(model, name, head)
    model.num_classes = state.original_num_classes
    for name, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(name, p.requires_grad))
    training = model.training
    del model.train, model.prompt_state
    return model.train(training)


remove_tcpa = remove_prompts


# ---------------------------------------------------------------------------------------- training API


def _unwrap(model):
    """The prompted model inside DDP/FSDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not hasattr(model, "prompt_state"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _state(model) -> PromptState:
    state = getattr(_unwrap(model), "prompt_state", None)
    if not isinstance(state, PromptState):
        raise ValueError(f"model: expected a model patched by apply_tcpa/apply_vpt, got {type(model).__name__} "
                         "without prompts")
    return state


def get_matching_loss(model):
    """Sum over layers of the matching loss of the last forward (a scalar tensor; 0 for VPT / random)."""
    return _state(model).matching_loss


def set_selection(model, mode):
    """Prompt selection of a TCPA model: "topk" (cosine matching) or "random" (a random k-subset per token,
    used by the published recipe for the first epochs; no matching loss then)."""
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode: expected one of {SELECTION_MODES}, got {mode!r}")
    _state(model).selection = mode
    return model


def trainable_parameters(model):
    """Parameters that train: prompts, keys and the classification head(s)."""
    _state(model)
    return [p for p in model.parameters() if p.requires_grad]


def save_trainable(model, path, key, meta):
    """A safetensors file of the model's trainable parameters, with ``meta`` as JSON under metadata ``key``."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={key: json.dumps(meta)})


def read_trainable(path, key):
    """(meta, tensors) of a save_trainable file; ValueError when it has no ``key`` metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(key)
        if meta is None:
            raise ValueError(f"path: {path} is not a {key} checkpoint (no '{key}' metadata)")
        return json.loads(meta), {name: f.get_tensor(name) for name in f.keys()}


def load_trainable(model, tensors):
    """Copy tensors into the model's trainable parameters; ValueError unless the keys and shapes match exactly."""
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(f"path: checkpoint keys differ from the model's trainable parameters: missing "
                         f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"path: {name} has shape {tuple(t.shape)}, model expects {tuple(params[name].shape)}")
            params[name].copy_(t)


def save_prompts(model, path):
    """Save only the trained parts (prompts, keys, head) and the config to a safetensors file."""
    state = _state(model)
    save_trainable(model, path, "tcpa_kernels", {"method": state.method, "config": dataclasses.asdict(state.config)})


def load_prompts(model, path):
    """Load a save_prompts checkpoint. A plain timm model is patched first with the saved config; a model
    patched with another config is rejected. Returns the model."""
    meta, tensors = read_trainable(path, "tcpa_kernels")
    method, config = meta["method"], meta["config"]
    if not hasattr(model, "prompt_state"):
        (apply_tcpa if method == "tcpa" else apply_vpt)(model, **config)
    state = _state(model)
    if state.method != method or dataclasses.asdict(state.config) != config:
        raise ValueError(f"path: checkpoint holds {method} {config}, model has {state.method} "
                         f"{dataclasses.asdict(state.config)}")
    load_trainable(model, tensors)
    return model
