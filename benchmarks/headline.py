"""The headline GPU measurement in one process: the environment and the device's two ceilings, the op at
the targets' shape (docs/how-it-works.md, 'Targets') against SDPA's backends and the published eager attention, the §6
train-step table (ViT-B/16, batch 128, bf16 autocast) of every method, and per-kernel profiler tables of one op
forward+backward and of one train step of each method.

    python benchmarks/headline.py [--out DIR]   # DIR/<device>-headline.json and DIR/<device>-kernels.txt
    python benchmarks/headline.py --smoke       # the same procedure at tiny shapes (on CPU it checks the script)

The JSON is rewritten after every figure and the tables file after every table, so a run cut short keeps what
it measured. Op times are ``triton.testing.do_bench`` medians (L2 flushed between calls); train steps are timed
one by one with CUDA events (median, min, max of TIMED_STEPS after WARMUP_STEPS). The baselines' keys and values
are built before the timed region (``bench.op_forward``). Ratios are TCPA (fused) over each baseline, next to
the §6 target they are held to (``met``: the ratio is at most the target).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tcpa_kernels import bench  # noqa: E402

SMOKE_OP = dict(B=2, H=2, N=17, P=8, D=16, topk=2)
SPEC_MODEL = dict(model_name="vit_base_patch16_224", img_size=224, batch=128, pool_size=18, topk=10)
SMOKE_MODEL = dict(model_name="vit_tiny_patch16_224", img_size=32, batch=2, pool_size=4, topk=2)
OP_METHODS = ("tcpa_fused", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_bool_mask", "dense_eager")
WARMUP_STEPS, TIMED_STEPS = 3, 20
# (level, mode or kind, baseline, figure) -> the largest TCPA / baseline ratio docs/how-it-works.md, 'Targets' allows
SPEC_TARGETS = {
    ("op", "fwd", "sdpa_flash", "ms"): 1.10,
    ("op", "fwd_bwd", "sdpa_flash", "ms"): 1.15,
    ("op", "fwd_bwd", "dense_eager", "ms"): 1 / 3,
    ("op", "fwd_bwd", "dense_eager", "memory_mb"): 1 / 3,
    ("model", "train", "no_prompts", "ms"): 1.05,
    ("model", "train", "no_prompts", "memory_mb"): 1.05,
    ("model", "train", "vpt_deep", "ms"): 0.90,
    ("model", "train", "vpt_deep", "memory_mb"): 0.90,
    ("model", "train", "tcpa_dense", "ms"): 1 / 1.5,
    ("model", "train", "tcpa_dense", "memory_mb"): 0.55,
}


class Report:
    """A JSON document rewritten (atomically, with the §6 ratios of what it holds) after every change, and a text
    file of profiler tables."""

    def __init__(self, json_path: Path, tables_path: Path, header: dict):
        self.json_path, self.tables_path, self.data = json_path, tables_path, dict(header)
        tables_path.write_text("")
        self.write()

    def add(self, section: str, key: str, value) -> None:
        self.data.setdefault(section, {})[key] = value
        self.write()

    def table(self, title: str, text: str) -> None:
        with self.tables_path.open("a") as f:
            f.write(f"== {title}\n{text}\n\n")

    def write(self) -> None:
        self.data["ratios"] = spec_ratios(self.data)
        self.data["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        partial = self.json_path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2))
        os.replace(partial, self.json_path)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(error: Exception) -> dict:
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0][:300] if lines else ''}"}


def environment(device) -> dict:
    """bench.environment plus, on CUDA, the chip, driver and attention libraries."""
    env = bench.environment(device)
    if device.type != "cuda":
        return env
    props = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        driver = _error(error)["error"]
    return env | {"capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                  "memory_gib": round(props.total_memory / 2**30, 1),
                  "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1), "driver": driver,
                  "cudnn": torch.backends.cudnn.version(),
                  "flash_attention_built": torch.backends.cuda.is_flash_attention_available()}


def ceilings(device, smoke: bool) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and the matrix-product rate on random data."""
    numel = 2**18 if smoke else 2**28  # fp32 elements: 1 MiB or 1 GiB copied
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench.time_ms(lambda: dst.copy_(src), device, reps=20)
    size, dtype = (256, torch.float32) if smoke or device.type != "cuda" else (8192, torch.bfloat16)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul_ms = bench.time_ms(lambda: a @ b, device, reps=20)
    # a CPU timer can read 0 ms on a tiny call
    return {"copy_gbps": 2 * numel * 4 / max(copy_ms, 1e-6) / 1e6, "copy_bytes": 2 * numel * 4,
            "matmul_tflops": 2 * size**3 / max(matmul_ms, 1e-6) / 1e9, "matmul_shape": [size] * 3,
            "matmul_dtype": str(dtype)}


def kernel_table(fn, device, rows: int = 25) -> tuple[str, list]:
    """torch.profiler's table of one call of fn (sorted by self device time on CUDA) and its top entries."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _synchronize(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    entries = [{"name": e.key, "calls": e.count, f"{key}_ms": getattr(e, key) / 1e3} for e in top]
    return averages.table(sort_by=key, row_limit=rows, max_name_column_width=80), entries


def measure_op(report: Report, device, dims: dict, dtype) -> None:
    """Every OP_METHODS x bench.OP_MODES at ``dims``: ms, TFLOP/s, GB/s, peak memory (or why it could not run)."""
    shape = {k: v for k, v in dims.items() if k != "topk"}
    for method in OP_METHODS:
        for mode in bench.OP_MODES:
            try:
                step = bench.make_op_step(method, mode, **dims, dtype=dtype, device=device)
                if step is None:
                    figures = {"skipped": f"no {method} on {device.type}"}
                else:
                    ms = bench.time_ms(step, device, reps=50)
                    figures = bench.op_figures(ms, step, mode, **shape, dtype=dtype, device=device)
            except (RuntimeError, NotImplementedError, ValueError) as error:
                figures = _error(error)
            step = None
            report.add("op", f"{method}/{mode}", figures)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    step = bench.make_op_step("tcpa_fused", "fwd_bwd", **dims, dtype=dtype, device=device)
    step()
    table, top = kernel_table(step, device)
    report.table(f"op tcpa_fused fwd+bwd {shape} {dtype}", table)
    report.add("kernels", "op/tcpa_fused/fwd_bwd", top)


def step_times_ms(step, device, warmup: int, timed: int) -> list[float]:
    """Each of ``timed`` calls of step timed alone (CUDA events; perf_counter on CPU) after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(timed):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timed)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def measure_models(report: Report, device, setting: dict, dtype, timed: int) -> None:
    """The §6 table: train-step time (each step timed), peak memory, inference time and a kernel table of one
    train step, for every method the model can run."""
    images = torch.randn(setting["batch"], 3, setting["img_size"], setting["img_size"], device=device)
    labels = torch.randint(0, 100, (setting["batch"],), device=device)
    for method in bench.model_methods(setting["model_name"]):
        name = f"{setting['model_name']}/b{setting['batch']}/{method}"
        try:
            model = bench.build_model(method, model_name=setting["model_name"], img_size=setting["img_size"],
                                      pool_size=setting["pool_size"], topk=setting["topk"], device=device)
            train = bench.train_step(model, images, labels, dtype)
            times = step_times_ms(train, device, WARMUP_STEPS, timed)
            figures = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                       "steps": len(times), "memory_mb": bench.peak_memory_mb(train, device)}
            report.add("model", f"{name}/train", figures)
            table, top = kernel_table(train, device)
            report.table(f"train step {name} {dtype}", table)
            report.add("kernels", f"model/{name}/train", top)
            infer_ms = bench.time_ms(bench.inference_step(model, images, dtype), device, reps=10)
            report.add("model", f"{name}/inference", {"ms": infer_ms})
        except (RuntimeError, NotImplementedError, ValueError) as error:
            report.add("model", f"{name}/train", _error(error))
        model = train = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def spec_ratios(data: dict) -> dict:
    """TCPA (fused) / baseline for every SPEC_TARGETS entry both sides of which were measured."""
    ratios = {}
    for (level, what, baseline, figure), target in SPEC_TARGETS.items():
        section = data.get(level, {})
        if level == "op":
            mine, theirs = section.get(f"tcpa_fused/{what}", {}), section.get(f"{baseline}/{what}", {})
        else:
            prefix = next((k.rsplit("/", 2)[0] for k in section if k.endswith(f"/tcpa_fused/{what}")), None)
            mine = section.get(f"{prefix}/tcpa_fused/{what}", {})
            theirs = section.get(f"{prefix}/{baseline}/{what}", {})
        if mine.get(figure) and theirs.get(figure):
            ratio = mine[figure] / theirs[figure]
            ratios[f"{level} {what} {figure}: tcpa_fused / {baseline}"] = {
                "ratio": ratio, "target": f"<= {target:.3g}", "met": ratio <= target}
    return ratios


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the tables")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the procedure, not figures")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ceilings", "op", "model"],
                        help="sections to leave out")
    args = parser.parse_args(argv)
    device = bench.default_device()
    smoke = args.smoke or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = bench.device_slug(device) + ("-smoke" if smoke else "")
    op_dims, model_setting = (SMOKE_OP, SMOKE_MODEL) if smoke else (bench.SPEC_OP_SHAPE, SPEC_MODEL)
    report = Report(out / f"{slug}-headline.json", out / f"{slug}-kernels.txt", {
        "environment": environment(device), "configuration": "smoke (tiny shapes: not figures)" if smoke else "spec",
        "op_shape": op_dims, "op_dtype": str(dtype), "model": model_setting, "model_autocast": str(dtype),
        "memory_metric": bench.memory_metric(device), "targets": "docs/how-it-works.md, 'Targets'"})
    if "ceilings" not in args.skip:
        report.add("ceilings", "measured", ceilings(device, smoke))
    if "op" not in args.skip:
        measure_op(report, device, op_dims, dtype)
    if "model" not in args.skip:
        measure_models(report, device, model_setting, dtype, 3 if smoke else TIMED_STEPS)
    print(f"{report.data['environment']['device']}, {report.data['configuration']}")
    for key, row in report.data["ratios"].items():
        print(f"{key:<60} {row['ratio']:7.3f}  target {row['target']:<8} {'met' if row['met'] else 'MISSED'}")
    print(f"wrote {report.json_path} and {report.tables_path}")
    return report.data


if __name__ == "__main__":
    main()
