"""Backend choice shared by every public function: "auto" | "triton" | "torch".

On a machine without CUDA the Triton interpreter is the only way to run the kernels, so importing
``tcpa_kernels`` there sets ``TRITON_INTERPRET=1`` (unless the user set it) before any kernel is
decorated. On a CUDA machine, run CPU tensors through the kernels by exporting TRITON_INTERPRET=1
before starting Python.
"""

import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Triton's own @jit helpers (tl.zeros, tl.argmax, ...) are bound to interpreter mode when triton is imported,
# so the switch only works if no one imported triton before us (``import timm`` does).
_TRITON_IMPORTED_WITHOUT_INTERPRETER = "triton" in sys.modules and not interpreter_enabled()
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and (_TRITON_IMPORTED_WITHOUT_INTERPRETER
                                                          or not interpreter_enabled()):
        raise ValueError(
            f"backend='triton' got tensors on {device}; Triton runs them only under its interpreter, which must "
            "be on before triton is first imported (timm imports it): export TRITON_INTERPRET=1 before Python "
            "starts, or import tcpa_kernels before timm (or use backend='torch')"
        )
    if backend == "triton" and device.type != "cuda":
        _check_interpreter_numpy()
    return backend


def _check_interpreter_numpy():
    """Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses (fixed in 3.7)."""
    import numpy
    import triton

    version = lambda text: tuple(int(part) for part in text.split(".")[:2])
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"backend='triton' on CPU runs the Triton interpreter, which in triton "
                           f"{triton.__version__} fails with numpy {numpy.__version__}: install numpy<2.4 or "
                           "triton>=3.7 (or use backend='torch')")
