"""Launching the library's Triton kernels with Triton's per-call dispatch paid once per specialization
(docs/how-it-works.md, 'Kernels').

``kernel[grid](*args, **kwargs)`` runs Triton's ``JITFunction.run`` at every call: it binds the arguments,
specialises each one (dtype, 16-byte alignment, integer properties), hashes the specialisation into a cache key,
looks the compiled kernel up, checks the globals the kernel read and builds launch metadata, then calls the compiled
kernel's launcher. That is host time of every launch (~17 us a launch on the development machine, measured with the
CUDA driver faked: ``benchmarks/fake_driver.py``), and a TCPA train step makes four launches per layer and two for
the prompt K/V pass of all layers.

``launch`` does that work once. The launchers pass each launch as (inputs, outputs, scalars, meta): the kernel's
tensor (or None) arguments, the caller's tensors first, then the outputs the launcher allocated for this launch,
then the plan's scalars and its meta-parameters and options, the last two the very objects of the launcher's cached
plan (``functools.cache``) for a given shape. The first launch of a (kernel, device, plan, pointer signature) goes
through ``kernel[grid]``, which compiles and returns the compiled kernel; later ones call that compiled kernel's
launcher directly, with the arguments ``JITFunction.run`` would pass it (the same call in Triton 3.6 to 3.9).

Everything Triton specialises on is in the key:
- the plan's scalars and meta-parameters, by the plan objects' identity (a direct entry keeps them alive, so their
  identities are not reused; the kernels are module globals);
- each input's dtype (or None), and each pointer's 16-byte alignment;
- each output's None-ness. An output's dtype is not read: the launcher allocates it from the plan and the inputs'
  dtypes (``torch.empty`` at offset 0, so aligned unless the allocator says otherwise, which the key still checks).
  A pointer is read once where the same tensor fills consecutive arguments (q, k, v of one packed tensor).

Triton's dispatch runs instead whenever launch hooks are registered (profilers read their metadata), in the
interpreter (its kernels are no ``JITFunction``) and with ``TCPA_KERNELS_DIRECT_LAUNCH=0`` in the environment.
"""

import os

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

DIRECT = os.environ.get("TCPA_KERNELS_DIRECT_LAUNCH", "1") != "0"
_COMPILED_ATTRS = ("run", "function", "packed_metadata")  # what a compiled kernel offers the direct call
_DISPATCH = object()  # a cache entry saying: always through Triton's dispatch
_cache: dict = {}  # ``_key`` -> _Direct or _DISPATCH


class _Direct:
    """A compiled kernel and the arguments after the pointers, in the kernel's signature order (and the plan's
    objects, kept alive: their identities are in the cache key)."""

    __slots__ = ("compiled", "tail", "plan")

    def __init__(self, compiled, tail, plan):
        self.compiled, self.tail, self.plan = compiled, tail, plan


def _key(kernel, device, scalars: tuple, meta: dict, inputs: tuple, outputs: tuple) -> tuple:
    """The cache key of a launch (module docstring): kernel, device, process (a forked child reloads), plan, each
    input's dtype or None, then two bit masks over the pointer positions: those off a 16-byte boundary, and the
    outputs that are None."""
    key = [id(kernel), device, os.getpid(), id(scalars), id(meta)]
    odd = absent = 0
    bit = 1
    last = dtype = last_odd = None
    for t in inputs:
        if t is None:
            key.append(None)
        else:
            if t is not last:  # (inline: every launch pays this loop)
                last, dtype, last_odd = t, t.dtype, t.data_ptr() & 15
            key.append(dtype)
            if last_odd:
                odd |= bit
        bit <<= 1
    for t in outputs:
        if t is None:
            absent |= bit
        else:
            if t is not last:
                last, last_odd = t, t.data_ptr() & 15
            if last_odd:
                odd |= bit
        bit <<= 1
    key.append(odd)
    key.append(absent)
    return tuple(key)


def _no_hooks(hook) -> bool:
    """No launch hook is registered (Triton 3.6-3.9 keep them in a ``HookChain``)."""
    return hook is None or (isinstance(hook, knobs.HookChain) and not hook.calls)


def _entry(kernel, compiled, pointers: int, scalars: tuple, meta: dict):
    """The cache entry of a first launch: direct when ``compiled`` is a compiled kernel and the call named every
    argument of the kernel (``pointers`` tensor arguments, the scalars, then the meta-parameters by name), else
    ``_DISPATCH``."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not all(hasattr(compiled, attr) for attr in _COMPILED_ATTRS):
        return _DISPATCH
    rest = names[pointers + len(scalars):]
    if not all(name in meta for name in rest):
        return _DISPATCH
    return _Direct(compiled, (*scalars, *(meta[name] for name in rest)), (scalars, meta))


def launch(kernel, grid: tuple, inputs: tuple, outputs: tuple, scalars: tuple, meta: dict) -> None:
    """``kernel[grid](*inputs, *outputs, *scalars, **meta)``; inputs: the kernel's leading tensor (or None)
    arguments, the caller's tensors; outputs: the tensor (or None) arguments after them, allocated by the launcher
    for this launch (their dtypes and None-ness follow from the plan and the inputs); scalars and meta: objects of the
    caller's cached launch plan (module docstring)."""
    hooks = knobs.runtime
    if not (DIRECT and type(kernel) is JITFunction and _no_hooks(hooks.launch_enter_hook)
            and _no_hooks(hooks.launch_exit_hook)):  # the interpreter's kernels are not JITFunctions
        kernel[grid](*inputs, *outputs, *scalars, **meta)
        return
    active = driver.active
    device = active.get_current_device()
    key = _key(kernel, device, scalars, meta, inputs, outputs)
    entry = _cache.get(key)
    if entry is None or entry is _DISPATCH:
        compiled = kernel[grid](*inputs, *outputs, *scalars, **meta)
        if entry is None:
            _cache[key] = _entry(kernel, compiled, len(inputs) + len(outputs), scalars, meta)
        return
    compiled = entry.compiled
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_y, grid_z, active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *inputs, *outputs, *entry.tail)
