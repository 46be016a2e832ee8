"""Host instructions of one ViT train step, counted by valgrind: the steps of ``benchmarks/host.py`` (ViT-B/16's
structure at width 12, every Triton launch stubbed), counted instead of timed.

    python benchmarks/host_instructions.py                       # no_prompts, vpt_deep, tcpa; 5 steps each
    python benchmarks/host_instructions.py --methods no_prompts,tcpa,tcpa_frozen_keys --json counts.json

Why: the host time of ``host.py`` is a wall-clock figure, and on a shared machine the speed of the same step drifts
(on the development machine by up to 1.7x between runs minutes apart), so a change of a few percent needs many
interleaved rounds to show. The number of instructions the CPU executes for a step does not drift: it is the
Python, dispatcher, autograd and allocator work itself, counted (runs so far agreed within 0.5%). It leaves out what
an instruction costs (cache misses, mispredicted branches), which is not the same for all code: TCPA's step, for
one, executes fewer instructions than the no-prompt step but makes 1.8x its Python calls (cProfile) and takes
longer. So the count complements the timing; it does not replace it.

How: each method runs in a process of its own under ``valgrind --tool=callgrind --collect-atstart=no`` (the processes
run in parallel): it builds the model and loads the kernel modules, then with the kernels stubbed as in ``host.py``
runs ``--warmup`` steps, turns callgrind's collection on (``torch._C._valgrind_toggle``, its client request, as
``torch.utils.benchmark`` uses it), runs ``--steps`` steps, and turns it off. The figure is callgrind's collected
total over the steps. Needs valgrind on PATH (Debian/Ubuntu: ``apt install valgrind``); under valgrind a process
runs ~50x slower: about three minutes per method on the development machine (two cores: six minutes for four
methods), most of it importing torch.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.cli import at_least, method_list  # noqa: E402

METHODS = ("no_prompts", "vpt_deep", "tcpa")
OTHERS = ("tcpa_frozen_keys",)  # an ablation of host.py that changes the model only (not the prompt K/V pass)
KERNEL_MODULES = ("_attention_kernels", "_match_kernels", "_prompt_kv_kernels", "_selection_kernels")
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def child(method: str, steps: int, warmup: int, depth: int = 12) -> None:
    """In the valgrind process: the step of ``host.py`` (``depth`` blocks), collection on around ``steps`` calls of
    it."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks import host
    from tcpa_kernels._backend import kernels

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = host.build_model(method, depth)
    step = host.make_step(method, model, model, torch.float32)
    for name in KERNEL_MODULES:  # loaded, so that the stubs replace their kernels (no real step: under valgrind
        kernels(name)  # the interpreter's would take ten minutes)
    with host.kernels_stubbed():
        for _ in range(warmup):
            step()
        torch._C._valgrind_toggle()
        for _ in range(steps):
            step()
        torch._C._valgrind_toggle()


def count(methods: list[str], steps: int = 5, warmup: int = 3) -> dict:
    """{"instructions_per_step": {method: n}, "ratios": {method: {"vs_no_prompts", "vs_vpt_deep"}}} (a ratio None
    where its base was not counted). Raises RuntimeError without valgrind, or when a process fails."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind: not found on PATH; install it (Debian/Ubuntu: apt install valgrind)")
    env = dict(os.environ, PYTHONHASHSEED="0", TRITON_INTERPRET="1")
    with tempfile.TemporaryDirectory() as folder:
        processes = {m: subprocess.Popen(
            [valgrind, "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={folder}/{m}.out",
             sys.executable, __file__, "--child", m, "--steps", str(steps), "--warmup", str(warmup)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for m in methods}
        per_step = {}
        for method, process in processes.items():
            _, err = process.communicate()
            found = COLLECTED.findall(err)
            if process.returncode != 0 or not found:
                raise RuntimeError(f"{method}: the valgrind process failed (exit {process.returncode}):\n{err[-2000:]}")
            per_step[method] = int(found[-1]) / steps

    def ratio(method, base):
        return per_step[method] / per_step[base] if base in per_step else None

    return {"instructions_per_step": per_step,
            "ratios": {m: {"vs_no_prompts": ratio(m, "no_prompts"), "vs_vpt_deep": ratio(m, "vpt_deep")}
                       for m in methods}}


def format_report(counted: dict) -> str:
    def x(value):
        return "-" if value is None else f"{value:.3f}x"

    lines = ["| method | instructions per step (millions) | vs no_prompts | vs vpt_deep |", "|---|---|---|---|"]
    for method, n in counted["instructions_per_step"].items():
        r = counted["ratios"][method]
        lines.append(f"| {method} | {n / 1e6:.2f} | {x(r['vs_no_prompts'])} | {x(r['vs_vpt_deep'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/host_instructions.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from "
                        f"{', '.join(METHODS + OTHERS)}")
    parser.add_argument("--steps", type=int, default=5, help="counted steps per method (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted steps per method first (default 3)")
    parser.add_argument("--json", help="also write the counts and the settings to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args(argv)
    at_least(parser, args, 1, "steps")
    at_least(parser, args, 0, "warmup")
    if args.child:
        return child(args.child, args.steps, args.warmup)
    methods = method_list(parser, args.methods, METHODS + OTHERS)
    counted = count(methods, args.steps, args.warmup)
    print(f"Host instructions of one train step (valgrind callgrind, {args.steps} steps counted per method), Triton "
          "launches stubbed: ViT-B/16 structure at width 12, batch 1, fp32, forward + backward; a CPU proxy, not GPU "
          "time\n")
    print(format_report(counted))
    if args.json:
        from benchmarks import host

        valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps(
            {"settings": {"steps": args.steps, "warmup": args.warmup, "model": host.MODEL, "threads": 1},
             "environment": host.environment() | {"valgrind": valgrind}, **counted}, indent=2))


if __name__ == "__main__":
    main()
