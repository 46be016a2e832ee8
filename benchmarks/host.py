"""Host time of one ViT train step with the GPU work removed: a CPU proxy for what a fast GPU waits on.

    python benchmarks/host.py                          # eager, fp32, 7 rounds x 15 steps per method
    python -m benchmarks.host --compile --dtype bf16 --optimizer --json host.json

When a train step is host-bound (small batch, fast GPU), its time is the Python, dispatcher, autograd and launch
work on the host; this script measures that work on a CPU. The model has ViT-B/16's structure (12 blocks, 12 heads,
timm ``vit_base_patch16_224``) at a tiny width (``embed_dim=12``, 16 px images: one patch, batch 1), so the CPU
kernels do almost no arithmetic, and every Triton kernel the project defines is replaced by a no-op launch
(``kernel[grid](...)`` does nothing; the launcher's allocations, checks and custom-op dispatch still run).

Methods, interleaved round by round in one process, model in ``.train()`` mode:

- ``no_prompts``: the frozen model, the head trains, a gradient required at the patch-embedding output (a forward
  hook ``out.requires_grad_()``), so the backward crosses every block as in prompt tuning;
- ``vpt_deep``: ``tk.apply_vpt(model, num_prompts=36, deep=True)``;
- ``tcpa``: ``tk.apply_tcpa(model, pool_size_cls=18, pool_size_img=18, topk_cls=10, topk_img=10, backend="triton")``;
- where tcpa's extra time goes (ablations, not targets; by name in ``--methods``): ``tcpa_constant_kv``, tcpa with
  every layer's prompt K/V replaced by constant tensors (no prompt K/V pass, no prompt gradient), and
  ``tcpa_frozen_keys``, tcpa with the keys frozen (no key gradient).

One step = forward, cross entropy (+ 0.01 x ``tk.get_matching_loss`` for tcpa and its ablations), backward, grads
set to None (``--optimizer``: plus an AdamW step, ``fused=False``, ``foreach=True`` as PyTorch picks on CUDA).

How the kernels are stubbed: one real step per method first runs the kernels in the Triton interpreter (fp32; this
imports the kernel modules), with ``TRITON_INTERPRET=1`` set before triton is imported; then every
``triton.runtime.KernelInterface`` attribute of the loaded ``tcpa_kernels*`` modules is replaced by an object whose
``__getitem__(grid)`` returns a no-op. The CPU-only checks that CUDA tensors never reach are replaced by no-ops too:
``tcpa_kernels._backend._check_interpreter`` (is the interpreter on?) and, wherever it is bound,
``refuse_interpreter_bf16`` (the interpreter's bf16 dots are wrong; reached under ``--dtype bf16`` only). A stubbed
kernel leaves its outputs uninitialised: the figures are times, the values are meaningless. Inside the stubs,
denormal floats flush to zero (``torch.set_flush_denormal``): the torch ops that read a stubbed kernel's output
read whatever the memory held (up to 7% denormals in a prompt bank's per-sample prompt-gradient buffers), and the
CPU's slow path for denormals made their arithmetic, host work a GPU does not do, slower (one run each, this CPU:
``benchmarks/bank.py``'s mixed step 5.25 ms without, 5.08 with; the single-task step 4.78 and 4.73). The stubs
count their calls: the table's "launches per step" is the number of Triton launches a GPU step would make.

``--launch driver`` keeps Triton's own dispatch in the figure, which the stubs leave out: Triton runs with its CUDA
driver replaced by a stand-in (``benchmarks/fake_driver.py``; the interpreter off), so each launch goes through
the project's launch path and, where it calls it, ``JITFunction.run`` (argument binding, specialisation, cache
lookup), down to the compiled kernel's launcher, which counts the launch and returns. The first step compiles
the kernels for sm_90 (a minute or two, then Triton's cache). The CPU-only checks are stubbed as above. The ablation
``tcpa_triton_dispatch`` (this mode only) is tcpa with every launch through ``kernel[grid]`` (Triton's dispatch at
every call, ``tcpa_kernels.ops._launch``), what the project's launches cost before they called compiled kernels
directly.

Timing: ``torch.set_num_threads(1)``; ``--warmup`` steps per method and mode, then ``--rounds`` rounds, each timing
``--steps`` steps of every method and mode in turn; a round's figure is its median step, the reported figure the
median of the rounds (with the rounds' min and max). A ratio is the median over the rounds of the two methods'
figures' ratio in that round (``paired_ratio``): the speed of a shared machine drifts (this one's by up to 1.7x
between runs minutes apart), and the two figures of a round are taken within a second or two of each other.
``--compile`` also times every method under ``torch.compile(model)`` (inductor; where inductor cannot run here,
``backend="aot_eager"``, and the output says so). ``--dtype bf16`` runs the step under CPU autocast to bf16.
Targets: tcpa <= 1.25x no_prompts and <= vpt_deep.

These are CPU host times of this machine, a proxy: a GPU's host runs the same Python and dispatcher work, but its
launches, allocator and CUDA-graph options differ.
"""

import os
import sys


def _driver_launch(argv: list[str]) -> bool:
    """``--launch driver`` among the arguments: read before anything imports triton (timm does), as Triton's real
    dispatch needs the interpreter off at that import and the stubs need it on."""
    return "--launch=driver" in argv or any(a == "--launch" and argv[i + 1:i + 2] == ["driver"]
                                            for i, a in enumerate(argv))


os.environ.setdefault("TRITON_INTERPRET", "0" if _driver_launch(sys.argv[1:]) else "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tcpa_kernels as tk  # noqa: E402
from benchmarks.cli import at_least, method_list  # noqa: E402
from tcpa_kernels import bench  # noqa: E402

METHODS = ("no_prompts", "vpt_deep", "tcpa")
ABLATIONS = ("tcpa_constant_kv", "tcpa_frozen_keys")  # tcpa with one part of its work removed (module docstring)
DISPATCH_ABLATION = "tcpa_triton_dispatch"  # --launch driver only: Triton's dispatch at every launch
MODES = ("eager", "compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"no_prompts": 1.25, "vpt_deep": 1.0}  # tcpa's ms per step over each, at most
# ViT-B/16's structure (12 blocks, 12 heads) at a width where the CPU does almost no arithmetic
MODEL = dict(model_name="vit_base_patch16_224", pretrained=False, img_size=16, embed_dim=12, num_heads=12,
             num_classes=100)
CPU_CHECKS = ("_check_interpreter", "refuse_interpreter_bf16")  # CPU-only checks, never reached by CUDA tensors


# ------------------------------------------------------------------------------------------------- stubs


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing (and is counted in ``launches``)."""

    launches = 0

    def __getitem__(self, grid):
        return _count_launch


def _count_launch(*args, **kwargs):
    _NoLaunch.launches += 1


def _no_op(*args, **kwargs):
    return None


def _project_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "tcpa_kernels" or name.startswith("tcpa_kernels."))]


@contextlib.contextmanager
def kernels_stubbed(kernels: bool = True):
    """Inside: every Triton kernel of the loaded ``tcpa_kernels*`` modules launches nothing (``kernels``; else they
    launch as they would: ``--launch driver``), the CPU-only interpreter checks pass and denormals flush to zero
    (module docstring). Yields the number of kernels stubbed (attributes, counted once per kernel object)."""
    import triton

    saved = []
    for module in _project_modules():
        for name, value in vars(module).items():
            if kernels and isinstance(value, triton.runtime.KernelInterface):
                saved.append((module, name, value, _NoLaunch()))
            elif name in CPU_CHECKS and callable(value):
                saved.append((module, name, value, _no_op))
    for module, name, _, stub in saved:
        setattr(module, name, stub)
    torch.set_flush_denormal(True)  # the unwritten outputs' denormals (module docstring)
    try:
        yield len({id(value) for _, _, value, stub in saved if isinstance(stub, _NoLaunch)})
    finally:
        torch.set_flush_denormal(False)
        for module, name, value, _ in saved:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------------ models


@contextlib.contextmanager
def constant_prompt_kv(models):
    """Inside, the forwards of these prompted models take every layer's prompt K/V from constant tensors (their
    values at entry, detached) instead of the prompt K/V pass: the ``tcpa_constant_kv`` ablation."""
    from tcpa_kernels import _forward

    pass_kv = _forward.all_layers_kv
    constant = {id(m.prompt_state): [t.detach() for t in pass_kv(m.prompt_state, 1)] for m in models}

    def prompt_kv(state, batch_size, bank=None):
        kv = constant.get(id(state))
        return pass_kv(state, batch_size, bank) if kv is None else kv

    _forward.all_layers_kv = prompt_kv
    try:
        yield
    finally:
        _forward.all_layers_kv = pass_kv


def build_model(method: str, depth: int = 12) -> torch.nn.Module:
    """The tiny ViT-B/16-shaped timm model prompted by ``method`` (one of METHODS or ABLATIONS), in train mode."""
    import timm

    if method in ABLATIONS + (DISPATCH_ABLATION,):  # tcpa's model; constant K/V and dispatch: the measurement
        model = build_model("tcpa", depth)
        if method == "tcpa_frozen_keys":
            for blk in model.blocks:
                blk.tcpa.keys_cls.requires_grad_(False)
                blk.tcpa.keys_img.requires_grad_(False)
        return model
    kwargs = dict(MODEL)
    model = timm.create_model(kwargs.pop("model_name"), depth=depth, **kwargs)
    if method == "no_prompts":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        model.patch_embed.register_forward_hook(lambda module, args, out: out.requires_grad_())
    elif method == "vpt_deep":
        tk.apply_vpt(model, num_prompts=36, deep=True)
    elif method == "tcpa":
        tk.apply_tcpa(model, pool_size_cls=18, pool_size_img=18, topk_cls=10, topk_img=10, backend="triton")
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return model.train()


def make_step(method, model, runner, dtype, optimizer=False):
    """One train step of ``runner`` (the model or its compiled wrapper) on one 16 px image."""
    images = torch.randn(1, 3, MODEL["img_size"], MODEL["img_size"])
    labels = torch.randint(0, MODEL["num_classes"], (1,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=False, foreach=True) if optimizer else None

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(runner(images), labels)
            if method.startswith("tcpa"):
                loss = loss + 0.01 * tk.get_matching_loss(model)
        loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None

    return step


def _compiled(model, step_of, backend):
    """(step, backend used, note): the step of ``torch.compile(model, backend=backend)`` after one call, which
    compiles; inductor falls back to aot_eager where it cannot run."""
    import torch._dynamo

    try:
        step = step_of(torch.compile(model, backend=backend))
        step()
        return step, backend, None
    except Exception as error:  # noqa: BLE001 (any compiler failure: no C++ toolchain, unsupported op, ...)
        if backend != "inductor":
            raise
        torch._dynamo.reset()
        note = f"inductor failed ({type(error).__name__}: {str(error).splitlines()[0][:160]}); aot_eager instead"
        step = step_of(torch.compile(model, backend="aot_eager"))
        step()
        return step, "aot_eager", note


# ------------------------------------------------------------------------------------------------ timing


def _time_steps(step, n):
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def paired_ratio(rounds: list[float], base_rounds: list[float]) -> float:
    """The median over rounds of one figure over another taken in the same round (module docstring)."""
    return statistics.median(a / b for a, b in zip(rounds, base_rounds, strict=True))


def measure(methods=METHODS, modes=("eager",), *, rounds=7, steps=15, warmup=5, dtype=torch.float32,
            optimizer=False, compile_backend="inductor", depth=12, threads=1, launch="stub") -> dict:
    """Host ms per train step of every method and mode, kernels stubbed (``launch="stub"``) or launched through
    Triton's dispatch into a stand-in driver (``"driver"``: the process must have imported triton with
    TRITON_INTERPRET=0).

    Returns ``{"results": {method: {mode: {"median_ms", "min_ms", "max_ms", "round_medians_ms",
    "launches_per_step"}}}, "ratios":
    {method: {mode: {"vs_no_prompts", "vs_vpt_deep"}}}, "compile_backend": str | None, "notes": [str],
    "kernels_stubbed": n}``; a ratio is the median over the rounds of the method's figure over the other method's in
    the same mode and round (``paired_ratio``; None where that method was not timed).
    """
    known = METHODS + ABLATIONS + ((DISPATCH_ABLATION,) if launch == "driver" else ())
    if not set(methods) <= set(known) or not set(modes) <= set(MODES) or "eager" not in modes:
        raise ValueError(f"methods, modes: expected some of {known} and 'eager' (+ 'compile'), got {methods}, {modes}")
    if launch not in ("stub", "driver"):
        raise ValueError(f"launch: expected 'stub' or 'driver', got {launch!r}")
    if launch == "driver":
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError("launch='driver': expected triton imported with TRITON_INTERPRET=0 (pass --launch driver "
                             "on the command line, or set it before anything imports triton), got TRITON_INTERPRET=1")
        from benchmarks import fake_driver

        fake_driver.install()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _measure(methods, modes, rounds, steps, warmup, dtype, optimizer, compile_backend, depth, launch)
    finally:
        torch.set_num_threads(threads_before)


def _measure(methods, modes, rounds, steps, warmup, dtype, optimizer, compile_backend, depth, launch):
    models = {m: build_model(m, depth) for m in methods}
    with contextlib.nullcontext() if launch == "stub" else kernels_stubbed(kernels=False):
        for method, model in models.items():  # real kernels once, in the interpreter (fp32: it refuses bf16 dots),
            make_step(method, model, model, torch.float32)()  # or compiled for sm_90 with the stand-in driver
    notes, used_backend = [], None
    constant = [models[m] for m in methods if m == "tcpa_constant_kv"]
    with kernels_stubbed(launch == "stub") as n_kernels, constant_prompt_kv(constant):
        steps_of = {}
        for method, model in models.items():
            steps_of[method, "eager"] = make_step(method, model, model, dtype, optimizer)
            if method == DISPATCH_ABLATION:
                steps_of[method, "eager"] = _triton_dispatch(steps_of[method, "eager"])
            if "compile" in modes:
                step, used_backend, note = _compiled(
                    model, lambda runner, method=method, model=model: make_step(method, model, runner, dtype,
                                                                                optimizer), compile_backend)
                steps_of[method, "compile"] = step
                if note:
                    notes.append(f"{method}: {note}")
        keys = [(m, mode) for m in methods for mode in modes]
        for key in keys:
            _time_steps(steps_of[key], warmup)
        per_round, launches = {key: [] for key in keys}, dict.fromkeys(keys, 0)
        for _ in range(rounds):
            for key in keys:
                before = _launch_count()
                per_round[key].append(statistics.median(_time_steps(steps_of[key], steps)))
                launches[key] += _launch_count() - before
    results = {m: {mode: {"median_ms": statistics.median(per_round[m, mode]), "min_ms": min(per_round[m, mode]),
                          "max_ms": max(per_round[m, mode]), "round_medians_ms": per_round[m, mode],
                          "launches_per_step": launches[m, mode] / (rounds * steps)}
                   for mode in modes} for m in methods}

    def ratio(method, mode, base):
        return paired_ratio(per_round[method, mode], per_round[base, mode]) if base in results else None

    ratios = {m: {mode: {"vs_no_prompts": ratio(m, mode, "no_prompts"), "vs_vpt_deep": ratio(m, mode, "vpt_deep")}
                  for mode in modes} for m in methods}
    return {"results": results, "ratios": ratios, "compile_backend": used_backend, "notes": notes,
            "kernels_stubbed": n_kernels, "launch": launch}


def _launch_count() -> int:
    """Launches so far: the stubs' and the stand-in driver's."""
    fake_driver = sys.modules.get("benchmarks.fake_driver")
    return _NoLaunch.launches + (fake_driver.launches() if fake_driver else 0)


def _triton_dispatch(step):
    """``step`` with every launch through ``kernel[grid]`` (``DISPATCH_ABLATION``)."""
    from tcpa_kernels.ops import _launch

    def dispatched():
        direct, _launch.DIRECT = _launch.DIRECT, False
        try:
            step()
        finally:
            _launch.DIRECT = direct

    return dispatched


# ------------------------------------------------------------------------------------------------ report


def _x(value):
    return "-" if value is None else f"{value:.2f}x"


def format_report(measured: dict) -> str:
    """The markdown table, the notes and the last line ``tcpa/no_prompts Rx, tcpa/vpt_deep Sx (eager)``."""
    results, ratios = measured["results"], measured["ratios"]
    lines = [f"| method | mode | ms per step (median) | min | max | vs no_prompts (tcpa target <= "
             f"{TARGETS['no_prompts']:.2f}x) | vs vpt_deep (tcpa target <= {TARGETS['vpt_deep']:.2f}x) "
             "| Triton launches per step |", "|---|---|---|---|---|---|---|---|"]
    for method, per_mode in results.items():
        for mode, r in per_mode.items():
            shown = mode if mode == "eager" else f"compile ({measured['compile_backend']})"
            lines.append(f"| {method} | {shown} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | "
                         f"{_x(ratios[method][mode]['vs_no_prompts'])} | {_x(ratios[method][mode]['vs_vpt_deep'])} | "
                         f"{r['launches_per_step']:g} |")
    lines += [f"note: {note}" for note in measured["notes"]]
    if "tcpa" in results:
        summary = {mode: f"tcpa/no_prompts {_x(r['vs_no_prompts'])}, tcpa/vpt_deep {_x(r['vs_vpt_deep'])} ({mode})"
                   for mode, r in ratios["tcpa"].items()}
        lines += ["", f"targets: tcpa <= {TARGETS['no_prompts']:.2f}x no_prompts and <= vpt_deep"]
        lines += [summary[mode] for mode in summary if mode != "eager"] + [summary["eager"]]
    return "\n".join(lines)


def environment() -> dict:
    return {"torch": torch.__version__, "triton": bench._package_version("triton"), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python benchmarks/host.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds, each timing every method and mode (default 7)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per method and mode per round (default 15)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method and mode first (default 5)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS + ABLATIONS)}")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) (inductor)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp32, or bf16 (CPU autocast)")
    parser.add_argument("--optimizer", action="store_true", help="add an AdamW step (fused=False) to every step")
    parser.add_argument("--launch", choices=("stub", "driver"), default="stub",
                        help="stub: Triton launches are no-ops (default); driver: through Triton's dispatch into a "
                             "stand-in CUDA driver (kernels compiled for sm_90 first)")
    parser.add_argument("--json", help="also write every figure, versions and the platform to this JSON file")
    args = parser.parse_args(argv)
    args.methods = method_list(parser, args.methods,
                               METHODS + ABLATIONS + ((DISPATCH_ABLATION,) if args.launch == "driver" else ()))
    at_least(parser, args, 1, "rounds", "steps")
    at_least(parser, args, 0, "warmup")
    if args.launch == "driver" and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("--launch driver: expected TRITON_INTERPRET unset or 0 (Triton's real dispatch; the interpreter "
                     "was on when triton was imported), got TRITON_INTERPRET=1")
    return args


def main(argv=None):
    args = parse_args(argv)
    modes = ("eager", "compile") if args.compile else ("eager",)
    measured = measure(args.methods, modes, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                       dtype=DTYPES[args.dtype], optimizer=args.optimizer, launch=args.launch)
    launches = (f"{measured['kernels_stubbed']} kernels stubbed (no-op launches)" if args.launch == "stub" else
                "Triton launches through its dispatch into a stand-in CUDA driver (nothing runs)")
    print(f"CPU host time of one train step, {launches}; a proxy for a host-bound GPU step, not GPU time: ViT-B/16 "
          f"structure (12 blocks, 12 heads) at width 12, batch 1, 16 px, {args.dtype}, "
          f"{'forward + backward + AdamW' if args.optimizer else 'forward + backward'}, 1 thread; median of "
          f"{args.rounds} rounds x {args.steps} steps ({environment()['processor']}, torch {torch.__version__}, "
          f"triton {environment()['triton']})\n")
    print(format_report(measured))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": {k: v for k, v in vars(args).items() if k != "json"} | {"model": MODEL, "threads": 1},
             "environment": environment(), **measured}, indent=2))


if __name__ == "__main__":
    main()
