"""Checkpoints of the trained parts only: prompts, keys and heads in a safetensors file with the config as metadata.

Keys are the plain model's parameter names whatever wraps it (DataParallel, DistributedDataParallel,
torch.compile). Under FSDP2 the shards are gathered: call ``save_prompts`` on every rank; rank 0 writes. Loading
checks the file's config and every key and shape before it changes the model.
"""

import dataclasses
import json
import re

import torch
from torch import nn

from tcpa_kernels._patch import is_shard, unwrap
from tcpa_kernels.vit import TCPAConfig, VPTConfig, apply_tcpa, apply_vpt, remove_prompts, state_of

METADATA_KEY = "tcpa_kernels"
# files of version 0.1.0 before the per-layer TCPAPrompts module: blocks.{i}.tcpa_keys_cls -> blocks.{i}.tcpa.keys_cls
_LEGACY_NAME = re.compile(r"^(.*\.)tcpa_((?:keys|prompts)_(?:cls|img))$")
# config fields of earlier files that no longer exist: "attention" chose the fused path or the dense baseline, which
# have the same parameters (the baseline is now ``dense_baseline.apply_dense_tcpa``)
_LEGACY_FIELDS = ("attention",)
METHODS = {"tcpa": (apply_tcpa, TCPAConfig), "vpt": (apply_vpt, VPTConfig)}


def _writes() -> bool:
    """This process writes the file: the only one, or rank 0 of an initialised process group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_trainable(model: nn.Module, path, metadata: dict[str, dict]) -> None:
    """A safetensors file of the model's trainable parameters, with each value of ``metadata`` as JSON under its
    key. FSDP2 shards are gathered on every rank (call it on all of them); only rank 0 writes."""
    from safetensors.torch import save_file

    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    sharded = any(is_shard(p) for p in params.values())
    tensors = {name: (p.full_tensor() if is_shard(p) else p).detach().contiguous().cpu() for name, p in params.items()}
    if _writes():
        save_file(tensors, str(path), metadata={key: json.dumps(meta) for key, meta in metadata.items()})
    if sharded:  # a collective call anyway: every rank returns once the file is there
        torch.distributed.barrier()


def read_trainable(path, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a save_trainable file; ValueError when it has no ``key`` metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(key)
        if meta is None:
            raise ValueError(f"path: {path} is not a {key} checkpoint (no '{key}' metadata)")
        return json.loads(meta), {name: f.get_tensor(name) for name in f.keys()}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's trainable parameters (FSDP2: each rank its shard); ValueError, before anything
    is copied, unless ``tensors`` has exactly their names and (full) shapes."""
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"path: checkpoint keys differ from the model's trainable parameters: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise ValueError(f"path: {name} has shape {tuple(t.shape)}, model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if is_shard(p):
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(t)


def save_prompts(model: nn.Module, path, extra_metadata: dict[str, dict] | None = None) -> None:
    """Save only the trained parts (prompts, keys, head) and the config to a safetensors file; ``extra_metadata``
    (JSON-serialisable dicts by key, e.g. a training script's own record) is stored beside the config."""
    state = state_of(model)
    extra = dict(extra_metadata or {})
    if METADATA_KEY in extra:
        raise ValueError(f"extra_metadata: key {METADATA_KEY!r} is the prompts config's own; use another key")
    config = {"method": state.method, "config": dataclasses.asdict(state.config)}
    save_trainable(model, path, {METADATA_KEY: config, **extra})


def load_prompts(model: nn.Module, path) -> nn.Module:
    """Load a save_prompts checkpoint. A plain timm model is patched first with the saved config; a model
    patched with another config is rejected. Config fields the file lacks (it was written before they existed) take
    their defaults. On any error the model is left as it was. Returns the model."""
    meta, tensors = read_trainable(path, METADATA_KEY)
    tensors = {_LEGACY_NAME.sub(r"\1tcpa.\2", name): t for name, t in tensors.items()}
    method, config = meta.get("method"), meta.get("config")
    if method not in METHODS or not isinstance(config, dict):
        raise ValueError(f"path: {path} holds no valid prompts config (method {method!r})")
    apply, config_class = METHODS[method]
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    config = {**defaults, **{k: v for k, v in config.items() if k not in _LEGACY_FIELDS}}
    inner = unwrap(model)
    if hasattr(inner, "prompt_state"):
        state = state_of(inner)
        if state.method != method or dataclasses.asdict(state.config) != config:
            raise ValueError(f"path: checkpoint holds {method} {config}, model has {state.method} "
                             f"{dataclasses.asdict(state.config)}")
        load_trainable(inner, tensors)
        return model
    apply(inner, **config)
    try:
        load_trainable(inner, tensors)
    except BaseException:
        remove_prompts(inner)
        raise
    return model
