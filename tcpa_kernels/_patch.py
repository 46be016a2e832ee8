"""Class swap: a prompted block or model is an instance of a generated subclass of its own class.

``apply_tcpa`` / ``apply_vpt`` set ``block.__class__`` to ``TCPA<Block>`` / ``VPT<Block>`` (the mixin's methods
first, then the block's own class) and ``model.__class__`` to ``Prompted<VisionTransformer>``; ``remove_prompts``
sets them back. Methods live on classes, not on instances, so a prompted model pickles like any module:
``torch.save(model)`` / ``torch.load``, ``copy.deepcopy`` and multiprocessing work. Each generated class is made once
per (mixin, base class) and carries a qualified name that encodes both (``TCPAMixin[timm/models/...:Block]``);
pickle looks it up in this module, whose ``__getattr__`` rebuilds it in a fresh process.
"""

import importlib
import sys

from torch import nn

MIXINS: dict[str, type] = {}
_GENERATED: dict[tuple[type, type], type] = {}


def register_mixin(mixin: type) -> type:
    """Class decorator: ``mixin`` (named ``<Prefix>Mixin``) can be combined with any module class."""
    MIXINS[mixin.__name__] = mixin
    return mixin


def _qualname(mixin: type, base: type) -> str:
    """A name pickle can split on dots: the base class as module:qualname with '/' for '.'."""
    return f"{mixin.__name__}[{base.__module__}:{base.__qualname__}]".replace(".", "/")


def prompted_class(mixin: type, base: type) -> type:
    """The subclass of ``base`` with ``mixin``'s methods in front, made once."""
    cls = _GENERATED.get((mixin, base))
    if cls is None:
        name = mixin.__name__.removesuffix("Mixin") + base.__name__
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": _qualname(mixin, base),
                                         "_prompted_base": base})
        _GENERATED[(mixin, base)] = cls
    return cls


def original_class(obj: nn.Module) -> type:
    """The class ``obj`` had before patching (its own class when it is not prompted)."""
    return getattr(type(obj), "_prompted_base", type(obj))


def __getattr__(name: str) -> type:
    """Pickle's lookup of a generated class in a process that has not made it yet."""
    mixin_name, sep, path = name.partition("[")
    if not sep or not path.endswith("]"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, _, qualname = path[:-1].replace("/", ".").partition(":")
    from tcpa_kernels.integrations.models import load_integrations

    load_integrations(module_name)  # registers the mixins of that package's integration
    if mixin_name not in MIXINS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = importlib.import_module(module_name)
    for part in qualname.split("."):
        base = getattr(base, part)
    return prompted_class(MIXINS[mixin_name], base)


def _wrapper_types() -> tuple[type, ...]:
    """Modules that hold the model as ``.module`` (data parallel) or ``._orig_mod`` (torch.compile)."""
    types = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded whenever torch.compile was used
    if dynamo is not None:
        types.append(dynamo.OptimizedModule)
    return tuple(types)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers (FSDP2's fully_shard
    changes the model in place and needs no unwrapping)."""
    wrappers = _wrapper_types()
    while isinstance(model, wrappers):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def is_shard(t) -> bool:
    """``t`` is a DTensor, as FSDP2 keeps parameters between forwards."""
    return any_shard((t,))


def any_shard(tensors) -> bool:
    """Some tensor of ``tensors`` is a DTensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # loaded whenever FSDP2 is used
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def is_fully_sharded(module: nn.Module) -> bool:
    """``fully_shard`` (FSDP2) was applied to ``module``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)
