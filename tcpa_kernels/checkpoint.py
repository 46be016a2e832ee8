"""Checkpoints of the trained parts only: prompts, keys, input prompter and heads in a safetensors file with the config
as metadata.

``save_prompts`` / ``load_prompts`` write and read one file; ``save_pretrained`` / ``from_pretrained`` an adapter
folder: ``prompts.safetensors`` (the same file) and ``prompt_config.json`` (its record, readable: method, config,
library version and the base model's identity, ``model_identity``). Loading refuses a base model whose identity
differs from the saved one (``check_identity=False`` loads anyway); files written before the identity existed load.

Keys are the plain model's parameter names whatever wraps it (DataParallel, DistributedDataParallel,
torch.compile). Under FSDP2 the shards are gathered: call ``save_prompts`` on every rank; rank 0 writes. Loading
checks the file's config, every key and shape and the identity before it changes the model.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from tcpa_kernels._patch import any_shard, is_shard, original_class, unwrap
from tcpa_kernels._validate import check_flag
from tcpa_kernels.integrations.input_prompter import input_prompter_of
from tcpa_kernels.integrations.models import model_family
from tcpa_kernels.vit import TCPAConfig, VPTConfig, apply_tcpa, apply_vpt, find_model, remove_prompts, state_of

METADATA_KEY = "tcpa_kernels"
WEIGHTS_NAME = "prompts.safetensors"  # the files of a save_pretrained folder
CONFIG_NAME = "prompt_config.json"
# files of version 0.1.0 before the per-layer TCPAPrompts module: blocks.{i}.tcpa_keys_cls -> blocks.{i}.tcpa.keys_cls
_LEGACY_NAME = re.compile(r"^(.*\.)tcpa_((?:keys|prompts)_(?:cls|img))$")
# config fields of earlier files that no longer exist: "attention" chose the fused path or the dense baseline, which
# have the same parameters (the baseline is now ``dense_baseline.apply_dense_tcpa``)
_LEGACY_FIELDS = ("attention",)
METHODS = {"tcpa": (apply_tcpa, TCPAConfig), "vpt": (apply_vpt, VPTConfig)}
# where a model keeps its input size: timm (also an open_clip TimmModel's trunk), Hugging Face, open_clip towers
_IMG_SIZE = ("patch_embed.img_size", "config.image_size", "config.vision_config.image_size", "image_size",
             "visual.image_size", "trunk.patch_embed.img_size", "visual.trunk.patch_embed.img_size")

PathLike = str | os.PathLike


def _writes() -> bool:
    """This process writes the file: the only one, or rank 0 of an initialised process group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}


def prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a prompts checkpoint holds, by the plain model's parameter names: every parameter ``apply_tcpa`` /
    ``apply_vpt`` added (each block's ``tcpa`` module or ``vpt_prompts``, the patch embedding's ``input_prompter``)
    and the classification head(s), whatever their ``requires_grad`` says now (a frozen layer's prompts are saved and
    loaded too)."""
    inner = find_model(model)
    state = state_of(inner)
    modules = [m for blk in state.blocks for m in (blk._modules.get("tcpa"),) if m is not None]
    modules += [getattr(inner, name) for name in state.original_heads]
    modules += [m for m in (input_prompter_of(state.input_site),) if m is not None]
    owned = {id(p) for m in modules for p in m.parameters()}
    owned |= {id(blk._parameters["vpt_prompts"]) for blk in state.blocks if "vpt_prompts" in blk._parameters}
    return {name: p for name, p in inner.named_parameters() if id(p) in owned}


def save_trainable(model: nn.Module | None, path: PathLike, metadata: dict[str, dict],
                   params: dict[str, nn.Parameter] | None = None) -> None:
    """A safetensors file of ``params`` (default: the model's parameters that require grad), with each value of
    ``metadata`` as JSON under its key. FSDP2 shards are gathered on every rank (call it on all of them); only rank 0
    writes."""
    from safetensors.torch import save_file

    params = _trainable(model) if params is None else params
    sharded = any_shard(params.values())
    tensors = {name: (p.full_tensor() if is_shard(p) else p).detach().contiguous().cpu() for name, p in params.items()}
    if _writes():
        save_file(tensors, str(path), metadata={key: json.dumps(meta) for key, meta in metadata.items()})
    if sharded:  # a collective call anyway: every rank returns once the file is there
        torch.distributed.barrier()


def read_trainable(path: PathLike, key: str, arg: str = "path") -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a save_trainable file; ValueError naming ``arg`` when it is no safetensors file or has no
    ``key`` metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(key)
            if meta is None:
                raise ValueError(f"{arg}: {path} is not a {key} checkpoint (no '{key}' metadata)")
            return json.loads(meta), {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{arg}: expected a safetensors file, got {path} ({error})") from None


def _check_tensors(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], arg: str) -> None:
    """ValueError unless ``tensors`` has exactly the names and (full) shapes of ``params``."""
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{arg}: checkpoint keys differ from the model's parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise ValueError(f"{arg}: {name} has shape {tuple(t.shape)}, model expects {tuple(params[name].shape)}")


def _copy(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if is_shard(p):
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(t)


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor],
                   params: dict[str, nn.Parameter] | None = None, arg: str = "path") -> None:
    """Copy tensors into ``params`` (default: the model's parameters that require grad; FSDP2: each rank its shard);
    ValueError naming ``arg``, before anything is copied, unless ``tensors`` has exactly their names and (full)
    shapes."""
    params = _trainable(model) if params is None else params
    _check_tensors(params, tensors, arg)
    _copy(params, tensors)


# ------------------------------------------------------------------------------------------ identity


def _attribute(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
    return obj


def _size(value) -> int | list[int] | None:
    """An image size as JSON keeps it: one int for a square, else [height, width]."""
    if isinstance(value, list | tuple):
        value = [int(v) for v in value]
        return value[0] if len(set(value)) == 1 else value
    return None if value is None else int(value)


def model_identity(model: nn.Module) -> dict:
    """The base model a prompts checkpoint was trained on, as far as it is known (None: unknown): ``name`` (timm:
    ``pretrained_cfg["architecture"]``; Hugging Face: ``config.name_or_path``), ``class`` (the model's own class,
    before patching), ``img_size`` (an int for a square), ``embed_dim``, ``depth`` (blocks) and
    ``num_prefix_tokens``."""
    inner = find_model(model, prompted=False)
    cfg = getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    name = name or _attribute(inner, "config.name_or_path") or None  # "" for a model built from a config
    size = next((value for value in (_attribute(inner, where) for where in _IMG_SIZE) if value is not None), None)
    family = model_family(inner)
    return {"name": name, "class": original_class(inner).__name__, "img_size": _size(size),
            "embed_dim": None if family is None else family.embed_dim(inner),
            "depth": None if family is None else len(family.blocks(inner)),
            "num_prefix_tokens": None if family is None else family.num_prefix_tokens(inner)}


def check_identity_of(saved, model: nn.Module, arg: str, path: PathLike) -> None:
    """ValueError naming every field the saved identity and the model's both know and disagree on."""
    if not isinstance(saved, dict):
        raise ValueError(f"{arg}: {path} holds no valid base-model identity (got {saved!r})")
    current = model_identity(model)
    differ = [f"{field} {value!r}, the model has {current[field]!r}" for field, value in saved.items()
              if value is not None and current.get(field) is not None and value != current[field]]
    if differ:
        raise ValueError(f"{arg}: {path}: prompts were trained on {'; '.join(differ)}; pass check_identity=False to "
                         "load anyway")


# ----------------------------------------------------------------------------------------- save / load


def _record(model: nn.Module) -> dict:
    """What a prompts checkpoint says about itself: method, config, library version, base-model identity."""
    from tcpa_kernels import __version__

    state = state_of(model)
    return {"method": state.method, "config": dataclasses.asdict(state.config), "version": __version__,
            "identity": model_identity(model)}


def _metadata(record: dict, extra_metadata: dict[str, dict] | None) -> dict[str, dict]:
    extra = dict(extra_metadata or {})
    if METADATA_KEY in extra:
        raise ValueError(f"extra_metadata: key {METADATA_KEY!r} is the prompts config's own; use another key")
    return {METADATA_KEY: record, **extra}


def save_prompts(model: nn.Module, path: PathLike, extra_metadata: dict[str, dict] | None = None) -> None:
    """Save only the trained parts (every prompt, key and head tensor, whatever its ``requires_grad``), the config,
    the library version and the base model's identity to the safetensors file ``path``; ``extra_metadata``
    (JSON-serialisable dicts by key, e.g. a training script's own record) is stored beside the config. Under FSDP2
    call it on every rank; rank 0 writes. ``save_pretrained`` writes a folder instead."""
    metadata = _metadata(_record(model), extra_metadata)
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"path: expected a file name, got the directory {path}; save_prompts writes one file (e.g. "
                         f"{file / WEIGHTS_NAME}), save_pretrained(model, {str(path)!r}) writes an adapter folder")
    if not file.parent.is_dir():
        raise ValueError(f"path: expected a file in an existing folder, got {path} (no folder {file.parent}); create "
                         "it, or use save_pretrained(model, dir), which creates its folder")
    save_trainable(model, file, metadata, prompt_parameters(model))


def save_pretrained(model: nn.Module, dir: PathLike, extra_metadata: dict[str, dict] | None = None) -> None:
    """Write the adapter folder ``dir`` (created if needed; its two files are replaced): ``prompts.safetensors``, the
    file ``save_prompts`` writes, and ``prompt_config.json``, its record as readable JSON (method, config, library
    ``version``, base-model ``identity``: :func:`model_identity`). Under FSDP2 call it on every rank; rank 0
    writes. ``from_pretrained(base_model, dir)`` loads it."""
    write_folder(dir, _record(model), prompt_parameters(model), extra_metadata)


def write_folder(dir: PathLike, record: dict, params: dict[str, torch.Tensor],
                 extra_metadata: dict[str, dict] | None = None, arg: str = "dir") -> None:
    """The adapter folder ``dir`` of ``save_pretrained`` from a prompts record (``_record``) and the tensors by the
    plain model's parameter names (FSDP2 shards gathered on every rank; rank 0 writes)."""
    metadata = _metadata(record, extra_metadata)
    folder = Path(dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{arg}: expected a folder, got the file {dir}; save_pretrained writes a folder, "
                         f"save_prompts(model, {str(dir)!r}) writes one file")
    folder.mkdir(parents=True, exist_ok=True)
    if _writes():
        (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    save_trainable(None, folder / WEIGHTS_NAME, metadata, params)


def _locate(path: PathLike, arg: str) -> tuple[Path, dict | None]:
    """(safetensors file, the folder's JSON record or None) of a prompts file or a save_pretrained folder."""
    given = Path(path)
    if not given.is_dir():
        if not given.exists():
            raise FileNotFoundError(f"{arg}: expected a prompts file or a save_pretrained folder, got {path}, which "
                                    "does not exist")
        return given, None
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (given / name).is_file()]
    if missing:
        raise ValueError(f"{arg}: expected a save_pretrained folder (with {WEIGHTS_NAME} and {CONFIG_NAME}), got "
                         f"{path}, which has no {' and no '.join(missing)}")
    try:
        return given / WEIGHTS_NAME, json.loads((given / CONFIG_NAME).read_text())
    except ValueError as error:
        raise ValueError(f"{arg}: {given / CONFIG_NAME} is not valid JSON ({error})") from None


def read_checkpoint(path: PathLike, arg: str) -> tuple[dict, str, dict, dict[str, torch.Tensor]]:
    """(record, method, config with the defaults of fields the file lacks, tensors by the current parameter names)
    of a save_prompts file or a save_pretrained folder; ValueError naming ``arg`` for anything else."""
    file, folder_record = _locate(path, arg)
    meta, tensors = read_trainable(file, METADATA_KEY, arg)
    if folder_record is not None and folder_record != meta:
        raise ValueError(f"{arg}: {Path(path) / CONFIG_NAME} differs from the record in {file} (save_pretrained writes "
                         "them together: was one of them replaced?)")
    tensors = {_LEGACY_NAME.sub(r"\1tcpa.\2", name): t for name, t in tensors.items()}
    method, config = meta.get("method"), meta.get("config")
    if method not in METHODS or not isinstance(config, dict):
        raise ValueError(f"{arg}: {path} holds no valid prompts config (method {method!r})")
    config_class = METHODS[method][1]
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    return meta, method, {**defaults, **{k: v for k, v in config.items() if k not in _LEGACY_FIELDS}}, tensors


def _load(model: nn.Module, path: PathLike, arg: str, check_identity: bool) -> nn.Module:
    check_flag("check_identity", check_identity)
    meta, method, config, tensors = read_checkpoint(path, arg)
    apply = METHODS[method][0]
    inner = find_model(model, prompted=False)
    patched = hasattr(inner, "prompt_state")
    if patched:
        state = state_of(inner)
        if state.method != method or dataclasses.asdict(state.config) != config:
            raise ValueError(f"{arg}: checkpoint holds {method} {config}, model has {state.method} "
                             f"{dataclasses.asdict(state.config)}")
    else:
        apply(inner, **config)
    try:
        params = prompt_parameters(inner)
        _check_tensors(params, tensors, arg)
        if check_identity and "identity" in meta:  # files written before the identity existed have none
            check_identity_of(meta["identity"], inner, arg, path)
        _copy(params, tensors)
    except BaseException:
        if not patched:
            remove_prompts(inner)
        raise
    return model


def load_prompts(model: nn.Module, path: PathLike, *, check_identity: bool = True) -> nn.Module:
    """Load a save_prompts file (or a save_pretrained folder) into ``model``. A plain model is patched first with the
    saved config; a model patched with another config is rejected. Config fields the file lacks (it was written
    before they existed) take their defaults. Unless ``check_identity=False``, a model whose identity
    (:func:`model_identity`) differs from the saved one in a field both know is refused. On any error the model is
    left as it was. Returns the model."""
    return _load(model, path, "path", check_identity)


def from_pretrained(base_model: nn.Module, dir: PathLike, *, check_identity: bool = True) -> nn.Module:
    """Load the save_pretrained folder ``dir`` (or a save_prompts file) into ``base_model``, as
    :func:`load_prompts` does: the identity check, the patching of a plain model, the model left as it was on any
    error. Returns the model."""
    return _load(base_model, dir, "dir", check_identity)
