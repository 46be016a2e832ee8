"""Python work per call of the library's ops, next to PyTorch SDPA's own per-call overhead (CPU, no GPU needed).

    python benchmarks/overhead.py [--reps 300]

Every Triton kernel launch is replaced by a no-op, so what is timed is everything the op does around its kernels:
argument checks, custom-op dispatch, autograd bookkeeping, allocations and the small aten ops outside the kernels
(the reductions of gradient partials). It runs at a tiny shape on CPU tensors with ``backend="triton"``, where
these costs dominate; on a GPU each of them is paid on the host while the GPU waits if the kernels are short.
SDPA's figure is a whole forward + backward at a shape so small that its compute is negligible: its overhead.
Figures are medians in microseconds of one forward + backward; they are CPU-host figures of this machine.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (first: CPU tensors reach the stubbed kernels in the interpreter)
from tcpa_kernels.ops import _attention_kernels, _match_kernels, _selection_kernels  # noqa: E402
from tcpa_kernels.ops.match_select import match_select  # noqa: E402
from tcpa_kernels.ops.packed import tcpa_packed_attention  # noqa: E402
from tcpa_kernels.ops.selection import Selection  # noqa: E402

KERNEL_MODULES = (_attention_kernels, _match_kernels, _selection_kernels)


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_stubbed():
    """Every Triton kernel of the library's kernel modules launches nothing inside this block."""
    import triton

    saved = [(module, name, fn) for module in KERNEL_MODULES for name, fn in vars(module).items()
             if isinstance(fn, triton.runtime.KernelInterface)]  # jit or interpreted
    for module, name, _ in saved:
        setattr(module, name, _NoLaunch())
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def median_us(step, reps):
    for _ in range(20):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def packed_attention_step(B=2, H=2, N=8, P=4, D=16):
    qkv = torch.randn(B, N, 3 * H * D).view(B, N, 3, H, D).requires_grad_()
    prompt_kv = torch.randn(2, H, P, D, requires_grad=True)
    sel = Selection(bits=torch.zeros(B, N, dtype=torch.int64), pool_cls=2, len_cls=1, len_img=1)

    def step():
        out = tcpa_packed_attention(qkv, prompt_kv, sel, scale=D**-0.5, renormalize=False, backend="triton")
        torch.autograd.grad(out, (qkv, prompt_kv), torch.ones_like(out))

    return step


def match_step(B=2, N=8, C=32, pool=4):
    x = torch.randn(B, N, C, requires_grad=True)
    keys_cls, keys_img = torch.randn(pool, C, requires_grad=True), torch.randn(pool, C, requires_grad=True)

    def step():
        _, terms = match_select(x, keys_cls, keys_img, topk_cls=2, topk_img=2, backend="triton")
        torch.autograd.grad(terms.sum(), (x, keys_cls, keys_img))

    return step


def sdpa_step(B=1, H=1, N=8, D=16):
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300, help="timed calls per figure (default 300)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps: expected an int >= 1, got {args.reps}")
    torch.set_num_threads(1)
    with kernels_stubbed():
        rows = [("tcpa_packed_attention, kernels stubbed", median_us(packed_attention_step(), args.reps)),
                ("match_select, kernel stubbed", median_us(match_step(), args.reps))]
    rows.append(("scaled_dot_product_attention (tiny shape: its overhead)", median_us(sdpa_step(), args.reps)))
    print("| per forward + backward (CPU host, median) | us |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
