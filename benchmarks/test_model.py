"""Model level: train step (forward + backward + AdamW) and inference of the no-prompt ViT, VPT-deep with the
same number of prompt tokens, the published dense-mask TCPA, and fused TCPA; plus a batch-size sweep."""

import pytest
import torch

from benchmarks.conftest import DEVICE, ON_GPU
from tcpa_kernels import bench

# (model, img_size, batch): ViT-B/16 B=128 is TCPA_SPEC.md §6
GPU_MODELS = [("vit_base_patch16_224", 224, 128), ("vit_small_patch16_224", 224, 256),
              ("vit_large_patch16_224", 224, 32)]
CPU_MODELS = [("vit_tiny_patch16_224", 64, 8)]
MODELS = GPU_MODELS if ON_GPU else CPU_MODELS
SWEEP = [32, 64, 128, 256] if ON_GPU else [2, 4]
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _bench_model(record, method, model_name, img_size, batch, kind):
    model = bench.build_model(method, model_name=model_name, img_size=img_size, pool_size=18, topk=10, device=DEVICE)
    images = torch.randn(batch, 3, img_size, img_size, device=DEVICE)
    labels = torch.randint(0, 100, (batch,), device=DEVICE)
    step = (bench.train_step(model, images, labels, DTYPE) if kind == "train"
            else bench.inference_step(model, images, DTYPE))
    step()
    record(step, f"model/{model_name}/b{batch}/{method}/{kind}",
           lambda ms: {"ms": ms, "memory_mb": bench.peak_memory_mb(step, DEVICE)},
           model=model_name, batch=batch, img_size=img_size, method=method, kind=kind, dtype=str(DTYPE))


@pytest.mark.parametrize("kind", ["train", "inference"])
@pytest.mark.parametrize("method", bench.MODEL_METHODS)
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
def test_model(record, model, method, kind):
    _bench_model(record, method, *model, kind)


@pytest.mark.parametrize("method", bench.MODEL_METHODS)
@pytest.mark.parametrize("batch", SWEEP)
def test_batch_sweep(record, batch, method):
    model_name, img_size, _ = MODELS[0]
    _bench_model(record, method, model_name, img_size, batch, "train")
