"""pytest-benchmark setup: GPU shapes on CUDA, a small CPU configuration otherwise (and it says so).

Every benchmark puts its figures in ``benchmark.extra_info`` and in a session summary (``write_summary``); its
timing table is grouped by level (op, model, sweep), and the session ends with a compact table of the headline
ratios, fused TCPA against each baseline (``pytest_terminal_summary``).
"""

import json
import time
from pathlib import Path

import pytest
import torch

from tcpa_kernels import bench

DEVICE = bench.default_device()
ON_GPU = DEVICE.type == "cuda"
SUMMARY = {"environment": bench.environment(DEVICE), "memory_metric": bench.memory_metric(DEVICE),
           "configuration": "gpu" if ON_GPU else "cpu-smoke (no CUDA: small shapes, PyTorch backend; not GPU figures)",
           "results": []}
SUMMARY_PATH = []  # set once the tests are collected
MODEL_DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # autocast dtype of the model-level benchmarks


# fused TCPA's baselines, per level (docs/how-it-works.md, 'Targets')
BASELINES = {"op": ("sdpa_flash", "sdpa_bool_mask", "dense_eager"),
             "model": ("no_prompts", "vpt_deep", "tcpa_dense"), "sweep": ("no_prompts", "vpt_deep", "tcpa_dense")}
COLUMNS = ["median", "iqr", "min", "max", "rounds"]  # pytest-benchmark's table, unless --benchmark-columns says


def pytest_configure(config):
    """A narrower pytest-benchmark table than its ten default columns (runs before pytest-benchmark reads them)."""
    if config.getoption("benchmark_columns", None) == ["min", "max", "mean", "stddev", "median", "iqr", "outliers",
                                                       "ops", "rounds", "iterations"]:
        config.option.benchmark_columns = COLUMNS


def pytest_report_header(config):
    return f"tcpa_kernels benchmarks on {SUMMARY['environment']['device']}: {SUMMARY['configuration']}"


def run_benchmark(benchmark, step, name, figures_fn, **info):
    """Time ``step`` with pytest-benchmark (CUDA synchronised inside), then record figures_fn(median_ms)."""
    def synced():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.group = name.split("/", 1)[0]  # one pytest-benchmark table per level: op, model, sweep
    benchmark.pedantic(synced, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=2 if ON_GPU else 1)
    ms = benchmark.stats.stats.median * 1e3
    figures = {"name": name, **info, **figures_fn(ms),
               "ms_spread": bench.summarize([seconds * 1e3 for seconds in benchmark.stats.stats.data])}
    benchmark.extra_info.update(SUMMARY["environment"] | {k: v for k, v in figures.items() if k != "name"})
    SUMMARY["results"].append(figures)
    write_summary()
    return figures


def fused_pairs(results):
    """(fused TCPA's figures, baseline name, the baseline's figures) for every fused result whose baseline, in the
    same level and setting, has a time."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        level = r["name"].split("/", 1)[0]
        method, what = r["name"].rsplit("/", 2)[-2:]
        if method != "tcpa_fused":
            continue
        for base in BASELINES[level]:
            other = by_name.get(r["name"].replace(f"/tcpa_fused/{what}", f"/{base}/{what}"))
            if other and other["ms"]:
                yield r, base, other


def spec_ratios(results):
    """docs/how-it-works.md, 'Targets' ratios from the results: fused / baseline, time and memory, side by side in one
    run."""
    return {f"{r['name']} vs {base}": {"time": r["ms"] / other["ms"], "memory": memory_ratio(r, other)}
            for r, base, other in fused_pairs(results)}


def memory_ratio(fused, other):
    return fused["memory_mb"] / other["memory_mb"] if other["memory_mb"] > 0 else None


def headline_table(results):
    """The headline ratios as text, one section per level: fused TCPA's median ms (TFLOP/s and GB/s at op level)
    and memory, then its time (memory) ratio to each baseline; * where a time behind a ratio is noisy."""
    rows = {}  # fused result name -> (fused figures, {baseline: cell})
    for r, base, other in fused_pairs(results):
        memory = "-" if memory_ratio(r, other) is None else f"{memory_ratio(r, other):.2f}"
        noisy = "*" if any("ms_spread" in f and bench.noisy(f["ms_spread"]) for f in (r, other)) else ""
        rows.setdefault(r["name"], (r, {}))[1][base] = f"{r['ms'] / other['ms']:.2f} ({memory}){noisy}"
    lines = ["fused TCPA's figure / the baseline's, time (memory): below 1, fused TCPA is faster (smaller)"]
    for level, baselines in BASELINES.items():
        level_rows = [(name, *row) for name, row in rows.items() if name.startswith(f"{level}/")]
        if not level_rows:
            continue
        lines.append(f"{level + ': fused TCPA':<36} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'MB':>8}"
                     + "".join(f" {base:>14}" for base in baselines))
        for name, r, cells in level_rows:
            case = name.split("/", 1)[1].replace("/tcpa_fused", "")
            rates = [f"{r[key]:8.3g}" if key in r else f"{'-':>8}" for key in ("tflops", "gbps")]
            lines.append(f"{case:<36} {r['ms']:9.3f} {' '.join(rates)} {r['memory_mb']:8.2f}"
                         + "".join(f" {cells.get(base, '-'):>14}" for base in baselines))
    lines.append(f"*: a time behind the ratio spreads over {bench.SPREAD_LIMIT:.0%} of its median (IQR): rerun "
                 "before trusting it")
    return "\n".join(lines) if len(lines) > 2 else ""


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter):
    table = headline_table(SUMMARY["results"])
    if table:
        terminalreporter.write_sep("-", "TCPA headline ratios")
        terminalreporter.write_line(table)
        terminalreporter.write_line(f"every figure: {SUMMARY_PATH[-1]}")


def pytest_collection_finish(session):
    """Name the summary after the levels collected: ``<device>-op``, ``<device>-model`` or ``<device>-model-op``."""
    levels = "-".join(sorted({item.module.__name__.rsplit("_", 1)[-1] for item in session.items}))
    folder = Path(__file__).parent / "results" if ON_GPU else Path(".benchmarks")
    SUMMARY_PATH.append(folder / f"{bench.device_slug(DEVICE)}-{levels}.json")


def write_summary():
    """The summary so far, rewritten after every benchmark (a run cut short still leaves its figures):
    ``benchmarks/results/`` on CUDA (commit it), ``.benchmarks/`` on CPU."""
    SUMMARY["ratios_fused_over_baseline"] = spec_ratios(SUMMARY["results"])
    SUMMARY["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    SUMMARY_PATH[-1].parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH[-1].write_text(json.dumps(SUMMARY, indent=2))


def bench_model(record, name, method, model_name, img_size, batch, kind, pool_size=18, topk=10):
    """Time and peak memory of one prompted model's train step or inference (top-k clamped to the pool)."""
    model = bench.build_model(method, model_name=model_name, img_size=img_size, pool_size=pool_size,
                              topk=min(topk, pool_size), device=DEVICE)
    images = torch.randn(batch, 3, img_size, img_size, device=DEVICE)
    labels = torch.randint(0, 100, (batch,), device=DEVICE)
    step = (bench.train_step(model, images, labels, MODEL_DTYPE) if kind == "train"
            else bench.inference_step(model, images, MODEL_DTYPE))
    step()  # optimizer state allocated before anything is measured
    record(step, name, lambda ms: {"ms": ms, "memory_mb": bench.peak_memory_mb(step, DEVICE)},
           model=model_name, batch=batch, img_size=img_size, pool_size=pool_size, method=method, kind=kind,
           dtype=str(MODEL_DTYPE))


@pytest.fixture
def record(benchmark):
    return lambda step, name, figures_fn, **info: run_benchmark(benchmark, step, name, figures_fn, **info)
