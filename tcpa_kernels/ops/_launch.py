"""Launching the library's Triton kernels with Triton's per-call dispatch paid once per specialization
(docs/how-it-works.md, 'Kernels').

``kernel[grid](*args, **kwargs)`` runs Triton's ``JITFunction.run`` at every call: it binds the arguments,
specialises each one (dtype, 16-byte alignment, integer properties), hashes the specialisation into a cache key,
looks the compiled kernel up, checks the globals the kernel read and builds launch metadata, then calls the compiled
kernel's launcher. That is host time of every launch (~17 us a launch on the development machine, measured with the
CUDA driver faked: ``benchmarks/fake_driver.py``), and a TCPA train step makes four launches per layer.

``launch`` does that work once. The launchers pass each launch as (pointers, scalars, meta): the tensor (or None)
arguments first, then the plan's scalars and its meta-parameters and options, the last two the very objects of the
launcher's cached plan (``functools.cache``) for a given shape. The first launch of a (kernel, device, plan, pointer
dtypes and alignments) goes through ``kernel[grid]``, which compiles and returns the compiled kernel; later ones
call that compiled kernel's launcher directly, with the arguments ``JITFunction.run`` would pass it (the same call
in Triton 3.6 to 3.9). Everything Triton specialises on is in the key: the plan's scalars and meta-parameters are
fixed by the plan objects' identity (a direct entry keeps them alive, so their identities are not reused; the
kernels are module globals), and the pointers by their dtype and 16-byte alignment. Triton's dispatch runs instead
whenever launch hooks are registered (profilers read their metadata), in the interpreter (its kernels are no
``JITFunction``) and with ``TCPA_KERNELS_DIRECT_LAUNCH=0`` in the environment.
"""

import os

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

DIRECT = os.environ.get("TCPA_KERNELS_DIRECT_LAUNCH", "1") != "0"
_COMPILED_ATTRS = ("run", "function", "packed_metadata")  # what a compiled kernel offers the direct call
_DISPATCH = object()  # a cache entry saying: always through Triton's dispatch
_cache: dict = {}  # (id(kernel), device, process, id(scalars), id(meta), pointer signature) -> _Direct or _DISPATCH


class _Direct:
    """A compiled kernel and the arguments after the pointers, in the kernel's signature order (and the plan's
    objects, kept alive: their identities are in the cache key)."""

    __slots__ = ("compiled", "tail", "plan")

    def __init__(self, compiled, tail, plan):
        self.compiled, self.tail, self.plan = compiled, tail, plan


def _signature(pointers: tuple) -> tuple:
    """What Triton specialises a pointer argument on: its dtype and whether its address is 16-byte aligned."""
    key = []
    for t in pointers:
        if t is None:
            key.append(None)
        else:
            key.append(t.dtype)
            key.append((t.data_ptr() & 15) == 0)
    return tuple(key)


def _no_hooks(hook) -> bool:
    """No launch hook is registered (Triton 3.6-3.9 keep them in a ``HookChain``)."""
    return hook is None or (isinstance(hook, knobs.HookChain) and not hook.calls)


def _entry(kernel, compiled, pointers: tuple, scalars: tuple, meta: dict):
    """The cache entry of a first launch: direct when ``compiled`` is a compiled kernel and the call named every
    argument of the kernel (pointers, scalars, then the meta-parameters by name), else ``_DISPATCH``."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not all(hasattr(compiled, attr) for attr in _COMPILED_ATTRS):
        return _DISPATCH
    rest = names[len(pointers) + len(scalars):]
    if not all(name in meta for name in rest):
        return _DISPATCH
    return _Direct(compiled, (*scalars, *(meta[name] for name in rest)), (scalars, meta))


def launch(kernel, grid: tuple, pointers: tuple, scalars: tuple, meta: dict) -> None:
    """``kernel[grid](*pointers, *scalars, **meta)``; pointers: the kernel's leading tensor (or None) arguments;
    scalars and meta: objects of the caller's cached launch plan (module docstring)."""
    hooks = knobs.runtime
    if not (DIRECT and type(kernel) is JITFunction and _no_hooks(hooks.launch_enter_hook)
            and _no_hooks(hooks.launch_exit_hook)):  # the interpreter's kernels are not JITFunctions
        kernel[grid](*pointers, *scalars, **meta)
        return
    active = driver.active
    device = active.get_current_device()
    key = (id(kernel), device, os.getpid(), id(scalars), id(meta), _signature(pointers))  # pid: a forked child reloads
    entry = _cache.get(key)
    if entry is None or entry is _DISPATCH:
        compiled = kernel[grid](*pointers, *scalars, **meta)
        if entry is None:
            _cache[key] = _entry(kernel, compiled, pointers, scalars, meta)
        return
    compiled = entry.compiled
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_y, grid_z, active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *pointers, *entry.tail)
