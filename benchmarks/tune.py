"""Tune the attention kernels' launch configurations (``LAUNCH_CONFIGS`` in tcpa_kernels/ops/_attention_kernels.py).

  python benchmarks/tune.py --offline   no GPU needed: compile every candidate for sm_90 and report what ptxas made
                                        of it (registers, spills, shared memory, wgmma) -> docs/sm90-resources.*
  python benchmarks/tune.py             on a GPU: time every candidate of every kernel at TCPA_SPEC.md §6 shapes,
                                        check its result against the current table's, write
                                        benchmarks/results/tune-<device>.json (then edit LAUNCH_CONFIGS by hand)
  python benchmarks/tune.py --smoke     the GPU procedure on CPU (interpreter, tiny shape): checks the script only

Each kernel (forward, backward: one launch each) is timed alone, the other at its table entry.
"""

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    "16-bit": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (64, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2),
               (128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 64, 4, 3),
               (32, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (128, 128, 8, 2)],
    "fp32": [(64, 64, 4, 3), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 64, 4, 2),
             (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 2, 1)],
}
KERNEL_LAUNCHES = [("fwd", {}), ("bwd", dict(ATOMIC=False))]
# (label, B, H, N, P, D, topk) at which candidates are timed on a GPU
GPU_SHAPES = [("vit_b_b128_n197_p36_k10", 128, 12, 197, 36, 64, 10),  # TCPA_SPEC.md §6
              ("vit_l_b32_n577_p200_l4_k12", 32, 16, 577, 200, 64, 12)]
SMOKE_SHAPES = [("cpu_smoke_b1_n40_p8_k2", 1, 2, 40, 8, 32, 2)]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.sm90` when run as a script (compile workers inherit it)


# ------------------------------------------------------------------------------------------ offline (sm_90)


def _compile_one(job):
    from benchmarks import sm90
    from tcpa_kernels.ops import _attention_kernels as kernels

    operand, d_pad, kernel, extra, candidate = job
    block_m, block_n, num_warps, num_stages = candidate
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, MASK_MODE=1, RENORMALIZE=False,
                      PRECISION=kernels.DOT_PRECISION[operand], **extra)
    try:
        dtype = "fp32" if operand == "fp32" else "bf16"
        figures = sm90.compile_attention(kernel, dtype, constexprs, num_warps, num_stages, prompt_dtype="fp32")
    except Exception as error:  # e.g. out of shared memory: reported, not fatal
        figures = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    in_table = kernels.LAUNCH_CONFIGS[(operand, d_pad)][kernel] == candidate
    return {"operand": operand, "d_pad": d_pad, "kernel": kernel, "config": list(candidate), "in_table": in_table,
            **figures}


def offline(out_dir, workers):
    os.environ["TRITON_INTERPRET"] = "0"
    jobs = [(operand, d_pad, kernel, extra, candidate) for operand in CANDIDATES for d_pad in (64, 128)
            for kernel, extra in KERNEL_LAUNCHES for candidate in CANDIDATES[operand]]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(_compile_one, jobs))
    import triton

    lines = [f"# sm_90 compile report (Triton {triton.__version__}, ptxas; no GPU involved)", "",
             "Default branch (selection bits, renormalize=False), bf16 or fp32 operands with fp32 prompt K/V (as the "
             "model passes them), aligned arguments as at ViT shapes. `spills` counts LDL+STL instructions in the "
             "SASS. Produced by `python benchmarks/tune.py "
             "--offline`: compile-time figures, not timings. (table): the entry of LAUNCH_CONFIGS.", "",
             "| operand | D_PAD | launch | BLOCK_M×BLOCK_N, warps, stages | registers | spills | shared KB | mma |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bm, bn, w, s = r["config"]
        config = f"{bm}×{bn}, {w}, {s}" + (" (table)" if r["in_table"] else "")
        if "error" in r:
            lines.append(f"| {r['operand']} | {r['d_pad']} | {r['kernel']} | {config} | {r['error']} ||||")
            continue
        mma = ", ".join(f"{k} {v}" for k, v in r["mma"].items()) or "FFMA only"
        lines.append(f"| {r['operand']} | {r['d_pad']} | {r['kernel']} | {config} | {r['registers']} | "
                     f"{r['spill_ops']} | {r['shared_bytes'] / 1024:.0f} | {mma} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sm90-resources.json").write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    (out_dir / "sm90-resources.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------ timed (GPU)


def _relative_error(result, baseline):
    worst = 0.0
    for got, want in zip(result, baseline):
        if want is not None:
            scale = want.double().abs().max().clamp_min(1e-12)
            worst = max(worst, float((got.double() - want.double()).abs().max() / scale))
    return worst


def _tune_shape(shape, dtype, candidates, tolerance, smoke, report, save):
    """Time every candidate of each kernel at one shape, the others at their table entry, into ``report``;
    ``save()`` after each kernel."""
    import torch

    from tcpa_kernels import bench
    from tcpa_kernels.ops import _attention_kernels as kernels

    label, B, H, N, P, D, topk = shape
    device = bench.default_device()
    tensors, scores = bench.op_inputs(B, H, N, P, D, dtype, device)
    tensors = [t.detach() for t in tensors]
    grad_out = torch.randn_like(tensors[0])
    selection = bench.op_selection(scores, P, topk)
    scale = D**-0.5
    out, lse = kernels.attention_forward(*tensors, *selection.op_args(), scale, False)
    steps = {"fwd": lambda: kernels.attention_forward(*tensors, *selection.op_args(), scale, False),
             "bwd": lambda: kernels.backward_grads(grad_out, *tensors, out, lse, selection, scale, False, True,
                                                       (True,) * 5)}
    table = kernels.LAUNCH_CONFIGS[kernels.config_key(D, dtype)]
    report |= {"shape": label, "dims": dict(B=B, H=H, N=N, P=P, D=D, topk=topk), "kernels": {}}
    for kernel, step in steps.items():
        current = table[kernel]
        baseline = [t.clone() for t in step()]
        rows = []
        for candidate in dict.fromkeys([current, *candidates]):
            table[kernel] = candidate
            kernels.forget_plans()  # the launch plans read the table when made
            try:
                error = _relative_error(step(), baseline)
                ms = bench.time_ms(step, device, reps=3 if smoke else 20)
                rows.append({"config": list(candidate), "ms": ms, "max_rel_diff": error, "ok": error <= tolerance})
            except Exception as exc:  # e.g. out of shared memory on this device: reported, not fatal
                rows.append({"config": list(candidate), "error": f"{type(exc).__name__}: {exc}"[:200]})
            finally:
                table[kernel] = current
                kernels.forget_plans()
            print(f"{label} {kernel} {candidate}: {rows[-1]}", flush=True)
        good = [r for r in rows if r.get("ok")]
        best = min(good, key=lambda r: r["ms"]) if good else None
        report["kernels"][kernel] = {"table": list(current), "candidates": rows, "best": best and best["config"],
                                     "speedup_over_table": best and rows[0].get("ms") and rows[0]["ms"] / best["ms"]}
        save()


def timed(shapes, smoke, out_path):
    import torch

    from tcpa_kernels import bench
    from tcpa_kernels.ops import _attention_kernels as kernels

    dtype = torch.float32 if smoke else torch.bfloat16
    candidates = CANDIDATES[kernels.operand_class(dtype)][: 2 if smoke else None]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # only the summation order differs between configs
    report = {"environment": bench.environment(bench.default_device()), "dtype": str(dtype), "smoke": smoke,
              "shapes": []}
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every kernel: a run cut short keeps what it timed
        out_path.write_text(json.dumps(report, indent=1))

    for shape in shapes:
        report["shapes"].append({})
        _tune_shape(shape, dtype, candidates, tolerance, smoke, report["shapes"][-1], save)
    for shape in report["shapes"]:
        for kernel, r in shape["kernels"].items():
            print(f"{shape['shape']:28s} {kernel:9s} table {r['table']} -> best {r['best']} "
                  f"({r['speedup_over_table'] or 0:.2f}x)")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="compile for sm_90 and report resources (no GPU)")
    mode.add_argument("--smoke", action="store_true", help="the timed procedure on CPU at a tiny shape")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/ offline, benchmarks/results/ timed)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles (offline)")
    args = parser.parse_args(argv)
    if args.offline:
        return offline(args.out or ROOT / "docs", args.workers)
    import benchmarks.interpreter  # noqa: F401  (--smoke: CPU tensors run in the Triton interpreter)
    from tcpa_kernels import bench

    device = bench.default_device()
    if device.type != "cuda" and not args.smoke:
        sys.exit("benchmarks/tune.py times kernels on a GPU: use --offline (compile report) or --smoke here")
    out = (args.out or ROOT / "benchmarks" / "results") / f"tune-{bench.device_slug(device)}.json"
    return timed(SMOKE_SHAPES if args.smoke else GPU_SHAPES, args.smoke, out)


if __name__ == "__main__":
    main()
