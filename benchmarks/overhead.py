"""Python work per call of the library's ops, next to PyTorch SDPA's own per-call overhead (CPU, no GPU needed).

    python benchmarks/overhead.py [--reps 1000]

Every Triton kernel launch is replaced by a no-op, so what is timed is everything the op does around its kernels:
argument checks, autograd bookkeeping, allocations and the small aten ops outside the kernels (the reductions of
gradient partials). It runs at a tiny shape on CPU tensors with ``backend="triton"``, where these costs dominate; on
a GPU each of them is paid on the host while the GPU waits if the kernels are short. SDPA's figure is a whole
forward + backward on q, k, v of the packed op's size (``[2, 2, 8, 16]``), small enough that its compute is
negligible: its overhead. The validated entries' figures include their argument checks, the model-path entries
skip them; the checks that only CPU tensors reach (is the Triton interpreter on? bf16 in the interpreter?) are
stubbed too, as CUDA tensors skip them.
Figures are medians in microseconds of one forward + backward, CPU-host figures of this machine; the targets
(``TARGETS``, over SDPA's figure): the model path's ``packed_attention`` within 1.25x, ``match`` within 1.1x, the
validated ``tcpa_packed_attention`` within 2x. A second pass, beside SDPA again, times the other model-path entries
(``attention`` of the [B, H, N, D] families, ``norm_match``) and the floor: a minimal autograd.Function of
packed_attention's shape that allocates what it must and launches nothing. A third pass times a pre-norm block's
whole attention half: ``block_attention`` (the one node a timm Block runs) against the no-prompt block's (layer
norm, qkv linear, SDPA, proj linear, residual). Figures move by some 5% from run to run
on a shared machine; compare ratios from one run.
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
from benchmarks.cli import at_least  # noqa: E402
from tcpa_kernels import _backend  # noqa: E402
from tcpa_kernels.ops import _attention_kernels, _match_kernels, _selection_kernels  # noqa: E402
from tcpa_kernels.ops.block import block_attention  # noqa: E402
from tcpa_kernels.ops.match_select import match, match_select, norm_match  # noqa: E402
from tcpa_kernels.ops.packed import packed_attention, tcpa_packed_attention  # noqa: E402
from tcpa_kernels.ops.selection import Selection  # noqa: E402
from tcpa_kernels.ops.tcpa_attention import attention  # noqa: E402

KERNEL_MODULES = (_attention_kernels, _match_kernels, _selection_kernels)
CPU_CHECKS = ((_backend, "_check_interpreter"), (_attention_kernels, "refuse_interpreter_bf16"))  # CUDA skips them


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_stubbed():
    """Inside this block every Triton kernel of the library's kernel modules launches nothing, and the checks that
    only CPU tensors reach (is the Triton interpreter on? bf16 in the interpreter?) pass without a look."""
    import triton

    saved = [(module, name, fn) for module in KERNEL_MODULES for name, fn in vars(module).items()
             if isinstance(fn, triton.runtime.KernelInterface)]  # jit or interpreted
    stubs = [(module, name, _NoLaunch()) for module, name, _ in saved]
    saved += [(module, name, getattr(module, name)) for module, name in CPU_CHECKS]
    stubs += [(module, name, lambda *args: None) for module, name in CPU_CHECKS]
    for module, name, stub in stubs:
        setattr(module, name, stub)
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def median_us(steps, reps, block=20):
    """{name: median us of one call} of the steps, each call timed on its own, the steps taking turns by blocks of
    ``block`` calls (drift from other work on the machine then weighs on every figure alike; the first calls of
    each block, caches cold from the other steps, are left out)."""
    times = {name: [] for name in steps}
    for _ in range(-(-reps // block) + 1):  # one more round: the warm-up
        for name, step in steps.items():
            for i in range(block + 5):
                start = time.perf_counter()
                step()
                if i >= 5:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t[block:]) for name, t in times.items()}


B, H, N, P, D = 2, 2, 8, 4, 16  # q, k, v [B, H, N, D]: tiny, the compute is negligible beside the host work


def packed_attention_step(public=True):
    """tcpa_packed_attention (validated) or packed_attention (the model path's entry) forward + backward."""
    qkv = torch.randn(B, N, 3 * H * D).view(B, N, 3, H, D).requires_grad_()
    prompt_kv = torch.randn(2, H, P, D, requires_grad=True)
    sel = Selection(bits=torch.zeros(B, N, dtype=torch.int64), pool_cls=2, len_cls=1, len_img=1)

    def step():
        if public:
            out = tcpa_packed_attention(qkv, prompt_kv, sel, scale=D**-0.5, renormalize=False, backend="triton")
        else:
            out = packed_attention(qkv, prompt_kv, sel, D**-0.5, False, "triton", True)
        torch.autograd.grad(out, (qkv, prompt_kv), torch.ones_like(out))

    return step


def attention_step():
    """attention (the model path's entry of the [B, H, N, D] families: q, k, v views of one qkv tensor, stacked
    prompt K/V) forward + backward."""
    qkv = torch.randn(B, N, 3 * H * D).view(B, N, 3, H, D).requires_grad_()
    prompt_kv = torch.randn(2, H, P, D, requires_grad=True)
    sel = Selection(bits=torch.zeros(B, N, dtype=torch.int64), pool_cls=2, len_cls=1, len_img=1)

    def step():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, prompt_kv, sel, D**-0.5, False, "triton", True)
        torch.autograd.grad(out, (qkv, prompt_kv), torch.ones_like(out))

    return step


def match_step(public=True, C=32, pool=4, norm=False):
    """match_select (validated), match (the model path's entry) or norm_match (the same with the block's
    LayerNorm fused: the model's call, h's gradient given) forward + backward."""
    x = torch.randn(B, N, C, requires_grad=True)
    keys_cls, keys_img = torch.randn(pool, C, requires_grad=True), torch.randn(pool, C, requires_grad=True)
    weight, bias = torch.ones(C), torch.zeros(C)

    def step():
        if norm:
            h, _, terms = norm_match(x, keys_cls, keys_img, weight, bias, 1e-6, 1, 2, 2, "triton")
            torch.autograd.grad((terms, h), (x, keys_cls, keys_img), (torch.ones_like(terms), torch.ones_like(h)))
            return
        if public:
            _, terms = match_select(x, keys_cls, keys_img, topk_cls=2, topk_img=2, backend="triton")
        else:
            _, terms = match(x, keys_cls, keys_img, 1, 2, 2, "triton")
        torch.autograd.grad(terms.sum(), (x, keys_cls, keys_img))

    return step


class _Floor(torch.autograd.Function):
    """The least an autograd.Function of packed_attention's shape does: 12 arguments; forward allocates out and lse
    and saves 5 tensors, backward allocates the 3 gradient buffers and sums the prompt partials over the batch."""

    @staticmethod
    def forward(ctx, qkv, prompt_kv, mask, bits, tasks, pool_cls, len_cls, len_img, scale, renormalize, backend,
                deterministic):
        out = torch.empty((B, N, H * D))
        ctx.save_for_backward(qkv, prompt_kv, out, torch.empty((B, H, N)), bits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, prompt_kv, *_ = ctx.saved_tensors
        dqkv, dprompt, _ = torch.empty(qkv.shape), torch.empty((B, *prompt_kv.shape)), torch.empty(B * H * N)
        return dqkv, dprompt.sum(0), *([None] * 10)


def floor_step():
    """_Floor forward + backward on packed_attention's tensors."""
    qkv = torch.randn(B, N, 3 * H * D).view(B, N, 3, H, D).requires_grad_()
    prompt_kv = torch.randn(2, H, P, D, requires_grad=True)
    bits = torch.zeros(B, N, dtype=torch.int64)

    def step():
        out = _Floor.apply(qkv, prompt_kv, None, bits, None, 2, 1, 1, D**-0.5, False, "triton", True)
        torch.autograd.grad(out, (qkv, prompt_kv), torch.ones_like(out))

    return step


def sdpa_step():
    """scaled_dot_product_attention forward + backward on q, k, v of the packed op's size."""
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return step


def attention_half_step(prompted=True):
    """A pre-norm block's attention half on x [B, N, C], forward + backward: ``block_attention`` (one node: norm1 +
    matching, qkv, attention, proj, residual) or, without prompts, what timm's Block runs (layer norm, qkv linear,
    SDPA, proj linear, residual add)."""
    C = H * D
    x = torch.randn(B, N, C, requires_grad=True)
    norm, qkv, proj = torch.nn.LayerNorm(C), torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
    for module in (norm, qkv, proj):
        module.requires_grad_(False)
    keys_cls, keys_img = torch.randn(2, C, requires_grad=True), torch.randn(2, C, requires_grad=True)
    prompt_kv = torch.randn(2, H, P, D, requires_grad=True)
    inputs = (x, keys_cls, keys_img, prompt_kv) if prompted else (x,)

    def step():
        if prompted:
            y, terms = block_attention(x, keys_cls, keys_img, prompt_kv, norm, qkv, proj, H, 1, 2, 2, 2, 1, 1,
                                       D**-0.5, False, "triton")
            torch.autograd.grad((y, terms), inputs, (torch.ones_like(y), torch.ones_like(terms)))
            return
        q, k, v = qkv(norm(x)).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        y = x + proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    return step


TCPA_PACKED, PACKED, MATCH = ("tcpa_packed_attention (validated)", "packed_attention (model-path entry)",
                               "match (model-path entry)")
TARGETS = {TCPA_PACKED: 2.0, PACKED: 1.25, MATCH: 1.1}  # fwd + bwd host time <= target x SDPA's


def _table(figures, base, label="x SDPA"):
    print(f"| per forward + backward (CPU host, launches stubbed, median) | us | {label} |\n|---|---|---|")
    for name, us in figures.items():
        print(f"| {name} | {us:.0f} | {us / figures[base]:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="timed calls per figure (default 1000)")
    args = parser.parse_args(argv)
    at_least(parser, args, 1, "reps")
    torch.set_num_threads(1)
    sdpa = f"scaled_dot_product_attention, q/k/v [{B}, {H}, {N}, {D}]"
    steps = {TCPA_PACKED: packed_attention_step(), PACKED: packed_attention_step(public=False),
             "match_select (validated)": match_step(), MATCH: match_step(public=False), sdpa: sdpa_step()}
    # the other model-path entries and the floor in a second pass, beside SDPA again: the steps of one pass take
    # turns, so more of them would leave each colder caches than the first pass's figures were measured with
    more = {"attention (model-path entry, [B, H, N, D])": attention_step(),
            "norm_match (model-path entry, LayerNorm fused)": match_step(public=False, norm=True),
            "minimal autograd.Function of packed_attention's shape (the floor)": floor_step(), sdpa: sdpa_step()}
    plain = "the same half without prompts (layer norm, qkv linear, SDPA, proj linear, residual)"
    halves = {"block_attention (a timm Block's attention half, one node)": attention_half_step(),
              plain: attention_half_step(prompted=False)}
    with kernels_stubbed():
        figures = median_us(steps, args.reps)
        more_figures = median_us(more, args.reps)
        half_figures = median_us(halves, args.reps)
    _table(figures, sdpa)
    print()
    for name, target in TARGETS.items():
        ratio = figures[name] / figures[sdpa]
        verdict = "met" if ratio <= target else "not met"
        print(f"target: {name} fwd + bwd <= {target:g}x SDPA's: {ratio:.2f}x, {verdict}")
    print("\nsecond pass:\n")
    _table(more_figures, sdpa)
    print(f"\nthird pass, a block's attention half on x [{B}, {N}, {H * D}]:\n")
    _table(half_figures, plain, "x no prompts")


if __name__ == "__main__":
    main()
