"""Backend choice shared by every public function: "auto" | "triton" | "torch".

Triton is imported only when the triton backend is used: the kernel modules (``ops/_*_kernels.py``) are loaded by
:func:`kernels` on first use, so ``import tcpa_kernels`` works where triton is not installed. Importing the package
changes no environment variable: to run CPU tensors through the kernels (the Triton interpreter), export
``TRITON_INTERPRET=1`` before Python starts.
"""

import contextlib
import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from tcpa_kernels._validate import describe

BACKENDS = ("auto", "triton", "torch")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # found, not imported


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``tcpa_kernels.ops.<name>`` (it imports triton), loaded on first use."""
    return importlib.import_module(f"tcpa_kernels.ops.{name}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints: the launchers' grid math (``triton.cdiv`` is a @jit function, slow to call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2`` in plain integer math."""
    return 1 << max(n - 1, 0).bit_length()


_ASSUMED_SMS: list[int] = []  # assume_sm_count's, innermost last


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the number
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None off CUDA, unless ``assume_sm_count`` says otherwise): the
    launchers size their grids by it."""
    return _ASSUMED_SMS[-1] if _ASSUMED_SMS else _device_sm_count(device)


@functools.cache
def _device_sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@contextlib.contextmanager
def assume_sm_count(sms: int):
    """Inside, the launchers plan as on a GPU of ``sms`` SMs whatever the device (a counting tool's view of a GPU
    step from CPU tensors: ``benchmarks/census.py``)."""
    _ASSUMED_SMS.append(sms)
    try:
        yield
    finally:
        _ASSUMED_SMS.pop()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on ``device`` ("auto": triton on CUDA where triton is installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and TRITON_INSTALLED else "torch"
    if backend == "triton" and not TRITON_INSTALLED:
        raise ImportError("backend='triton' needs the triton package, which is not installed (tcpa_kernels requires "
                          "it on Linux only); use backend='torch' or backend='auto'")
    if backend == "triton" and device.type != "cuda":
        _check_interpreter(device)
    return backend


def _check_interpreter(device: torch.device) -> None:
    """CPU tensors run in the Triton interpreter, which must have been on when triton was first imported: triton's
    own @jit helpers (tl.zeros, tl.argmax, ...) are bound to interpreter mode then."""
    import numpy
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not interpreter_enabled() or not isinstance(tl.argmax, InterpretedFunction):
        raise ValueError(
            f"backend='triton' got tensors on {device}; Triton runs them only under its interpreter, which must be "
            "on before triton is first imported (timm imports it): export TRITON_INTERPRET=1 before Python starts "
            "(or use backend='torch')"
        )
    version = lambda text: tuple(int(part) for part in text.split(".")[:2])
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        # Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses (fixed in 3.7)
        raise RuntimeError(f"backend='triton' on CPU runs the Triton interpreter, which in triton "
                           f"{triton.__version__} fails with numpy {numpy.__version__}: install numpy<2.4 or "
                           "triton>=3.7 (or use backend='torch')")


def refuse_interpreter_bf16(name: str, t: torch.Tensor) -> None:
    """Called by the attention launchers: the Triton interpreter (tensors off CUDA) computes bf16 ``tl.dot`` wrongly.
    Its fp16 dots are right, and the matching kernels convert bf16 to fp32 before their dots: those run."""
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        raise TypeError(f"{name}: backend='triton' on {t.device} tensors runs the Triton interpreter, which computes "
                        f"bf16 dots wrongly, got {describe(t)}; use backend='torch', fp16/fp32, or CUDA tensors")


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context when it is off already: cheaper to enter)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
