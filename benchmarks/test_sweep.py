"""Scaling sweeps of the train step (forward + backward + AdamW) for every method: batch size, prompt count (entries
per pool; VPT-deep gets the same number of prompt tokens) and image size (N = 197 at 224 px, 577 at 384 px)."""

import pytest

from benchmarks.conftest import ON_GPU, bench_model
from tcpa_kernels import bench

# model, img_size, batch, pool_size of the point each axis moves away from (ViT-B/16 B=128 is docs/how-it-works.md,
# 'Targets')
GPU_BASE = dict(model_name="vit_base_patch16_224", img_size=224, batch=128, pool_size=18)
CPU_BASE = dict(model_name="vit_tiny_patch16_224", img_size=64, batch=4, pool_size=4)
BASE = GPU_BASE if ON_GPU else CPU_BASE
# the image axis runs at batch 32 on GPU: the dense-mask baseline at 577 tokens and batch 128 would not fit in 80 GB
GPU_AXES = [("batch", v, {}) for v in (32, 64, 128, 256)] + [("pool_size", v, {}) for v in (9, 18, 32)] + [
    ("img_size", v, {"batch": 32}) for v in (224, 384)]
CPU_AXES = [("batch", 2, {}), ("batch", 8, {}), ("pool_size", 2, {}), ("pool_size", 9, {}), ("img_size", 32, {})]
AXES = GPU_AXES if ON_GPU else CPU_AXES


@pytest.mark.parametrize("method", bench.MODEL_METHODS)
@pytest.mark.parametrize("axis, value, extra", AXES, ids=[f"{a}={v}" for a, v, _ in AXES])
def test_sweep(record, axis, value, extra, method):
    setting = BASE | extra | {axis: value}
    bench_model(record, f"sweep/{axis}={value}/{method}/train", method, setting["model_name"], setting["img_size"],
                setting["batch"], "train", pool_size=setting["pool_size"])
