"""Op level: TCPA fused forward / backward / forward+backward vs SDPA on the same N+P keys (no mask), SDPA
with the equivalent boolean mask, FlexAttention (CUDA), and the library's PyTorch backend. FLOP and byte formulas:
``tcpa_kernels/bench.py``."""

import pytest
import torch

from benchmarks.conftest import DEVICE, ON_GPU
from tcpa_kernels import bench

# (label, B, H, N, P, D, topk): topk pool entries per token; P = 200 uses entries of 4 prompt tokens (50 entries)
GPU_SHAPES = [
    ("vit_b_b128_n197_p36_k10", 128, 12, 197, 36, 64, 10),  # docs/how-it-works.md, 'Targets'
    ("vit_s_b256_n197_p36_k10", 256, 6, 197, 36, 64, 10),
    ("vit_l_b32_n577_p200_l4_k12", 32, 16, 577, 200, 64, 12),
    ("vit_b_b32_n577_p36_k1", 32, 12, 577, 36, 64, 1),
    ("vit_b_b64_n197_p200_l4_k25", 64, 12, 197, 200, 64, 25),
]
CPU_SHAPES = [("cpu_smoke_b2_n65_p8_k2", 2, 3, 65, 8, 64, 2)]
SHAPES = GPU_SHAPES if ON_GPU else CPU_SHAPES
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.mark.parametrize("mode", bench.OP_MODES)
@pytest.mark.parametrize("method", bench.OP_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_op(record, shape, method, mode):
    label, B, H, N, P, D, topk = shape
    dims = dict(B=B, H=H, N=N, P=P, D=D)
    step = bench.make_op_step(method, mode, **dims, topk=topk, dtype=DTYPE, device=DEVICE)
    if step is None:
        pytest.skip(f"{method} has no equivalent on {DEVICE.type}")
    record(step, f"op/{label}/{method}/{mode}",
           lambda ms: bench.op_figures(ms, step, mode, **dims, dtype=DTYPE, device=DEVICE),
           shape=label, method=method, mode=mode, dtype=str(DTYPE), topk=topk, **dims)
