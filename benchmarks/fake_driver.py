"""Triton's real dispatch on a machine without a GPU: a stand-in CUDA driver for host-time measurements and tests.

    TRITON_INTERPRET=0 python -c "import benchmarks.fake_driver as fd; fd.install(); ..."

``install()`` makes Triton believe it drives one Hopper GPU (sm_90, 132 SMs): a kernel's first launch compiles it
with Triton's real compiler (down to a cubin, as ``benchmarks/sm90.py`` does), and every launch runs
``JITFunction.run`` (argument binding, specialisation, cache lookup) up to the compiled kernel's launcher, which is
replaced by a counter: nothing runs, and the outputs keep whatever their memory held. CPU tensors stand in for
device memory (Triton reads only their addresses and dtypes before the launcher). With ``install(record=True)``
(tests), ``last_launch()`` is the last launch: the compiled kernel's launcher (one per compiled kernel) and the
arguments it received; without, no launch keeps a reference to its arguments, as a real launcher keeps none (kept
references would delay the frees of the tensors and change the host time being measured).

TRITON_INTERPRET must be 0 (unset) when triton is first imported: the interpreter binds triton's own helpers then.
"""

from triton.backends.compiler import GPUTarget
from triton.runtime import driver

TARGET = GPUTarget("cuda", 90, 32)


class _Utils:
    """The driver's module loading and device queries, answered for one sm_90 device."""

    def load_binary(self, name, kernel, shared, device):
        return name, 1, 0, 0, 1024  # module (not None: loaded once), function handle, registers, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module):
        pass


class _Launcher:
    """Stands in for a compiled kernel's launcher (one per compiled kernel): counts the launches of every kernel
    and, when recording, keeps the last one."""

    calls = 0  # launches of every kernel
    record = False
    last: tuple | None = None  # (launcher, its arguments) of the last launch, when recording

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        _Launcher.calls += 1
        if _Launcher.record:
            _Launcher.last = (self, args)


def launches() -> int:
    """Launches so far, every kernel's."""
    return _Launcher.calls


def last_launch() -> tuple:
    """(launcher, arguments) of the last launch (``install(record=True)``)."""
    if _Launcher.last is None:
        raise RuntimeError("no launch recorded: install(record=True) before launching")
    return _Launcher.last


class FakeCudaDriver:
    """What ``JITFunction.run`` and the compiler ask of the active driver (Triton 3.6-3.9)."""

    launcher_cls = _Launcher

    def __init__(self):
        self.utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def is_active(self):
        return True


def install(record: bool = False) -> None:
    """Make the stand-in driver Triton's active driver (for the rest of the process); ``record``: keep the last
    launch for ``last_launch()``."""
    _Launcher.record = record
    driver.set_active(FakeCudaDriver())
