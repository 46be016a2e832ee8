"""pytest-benchmark setup: GPU shapes on CUDA, a small CPU configuration otherwise (and it says so).

Every benchmark puts its figures in ``benchmark.extra_info`` and in a session summary (``write_summary``).
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


def pytest_report_header(config):
    return f"tcpa_kernels benchmarks on {SUMMARY['environment']['device']}: {SUMMARY['configuration']}"


def run_benchmark(benchmark, step, name, figures_fn, **info):
    """Time ``step`` with pytest-benchmark (CUDA synchronised inside), then record figures_fn(median_ms)."""
    def synced():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=2 if ON_GPU else 1)
    ms = benchmark.stats.stats.median * 1e3
    figures = {"name": name, **info, **figures_fn(ms)}
    benchmark.extra_info.update(SUMMARY["environment"] | {k: v for k, v in figures.items() if k != "name"})
    SUMMARY["results"].append(figures)
    write_summary()
    return figures


def spec_ratios(results):
    """TCPA_SPEC.md §6 ratios from the results: fused / baseline, time and memory, side by side in one run."""
    by_name = {r["name"]: r for r in results}
    ratios = {}
    for r in results:
        kind = r["name"].split("/", 1)[0]
        method, what = r["name"].rsplit("/", 2)[-2:]
        if method != "tcpa_fused":
            continue
        baselines = (("sdpa_flash", "sdpa_bool_mask", "dense_eager") if kind == "op"
                     else ("no_prompts", "vpt_deep", "tcpa_dense"))
        for base in baselines:
            other = by_name.get(r["name"].replace(f"/tcpa_fused/{what}", f"/{base}/{what}"))
            if other and other["ms"]:
                memory = r["memory_mb"] / other["memory_mb"] if other["memory_mb"] > 0 else None
                ratios[f"{r['name']} vs {base}"] = {"time": r["ms"] / other["ms"], "memory": memory}
    return ratios


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
