"""Model level: train step (forward + backward + AdamW) and inference of the no-prompt ViT, VPT-deep with the
same number of prompt tokens, the published dense-mask TCPA, and fused TCPA (docs/how-it-works.md, 'Targets').
Scaling sweeps: ``test_sweep.py``."""

import pytest

from benchmarks.conftest import ON_GPU, bench_model
from tcpa_kernels import bench

# (model, img_size, batch): ViT-B/16 B=128 is docs/how-it-works.md, 'Targets'
GPU_MODELS = [("vit_base_patch16_224", 224, 128), ("vit_small_patch16_224", 224, 256),
              ("vit_large_patch16_224", 224, 32)]
CPU_MODELS = [("vit_tiny_patch16_224", 64, 8)]
MODELS = GPU_MODELS if ON_GPU else CPU_MODELS


@pytest.mark.parametrize("kind", ["train", "inference"])
@pytest.mark.parametrize("method", bench.MODEL_METHODS)
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
def test_model(record, model, method, kind):
    model_name, img_size, batch = model
    bench_model(record, f"model/{model_name}/b{batch}/{method}/{kind}", method, model_name, img_size, batch, kind)
