"""The GPU benchmark configurations are valid: every op shape and model that benchmarks/ and the tuning script
run on a GPU builds and runs one step here on CPU, at batch 1 and one head (PyTorch backend), so that a GPU
session is not spent finding a configuration error. Figures are not checked."""

import pytest
import torch

from benchmarks import test_model, test_op, test_sweep, tune
from reference import tcpa_attention_ref
from tcpa_kernels import bench, profile
from tests.conftest import fp64
from tests.test_fused import reference_mask

CPU = torch.device("cpu")
GPU_OP_SHAPES = {s[0]: s for s in test_op.GPU_SHAPES + tune.GPU_SHAPES}


@pytest.mark.parametrize("method", [m for m in bench.OP_METHODS if m != "flex_attention"])  # Flex: no CPU backward
@pytest.mark.parametrize("label", sorted(GPU_OP_SHAPES))
def test_gpu_op_shape_runs(label, method):
    _, _, _, N, P, D, topk = GPU_OP_SHAPES[label]
    step = bench.make_op_step(method, "fwd_bwd", B=1, H=1, N=N, P=P, D=D, topk=topk, dtype=torch.float32, device=CPU)
    grads = step()
    assert all(torch.isfinite(g).all() for g in grads)


def test_op_baselines_compute_what_they_claim():
    """Same inputs, same selection (the reference's top-k rule): SDPA with the bool mask and FlexAttention
    (forward only: no backward on CPU) equal the fp64 reference with renormalize=True, the masked softmax they
    compute; the fused op and the library's PyTorch backend equal it with TCPA's post-softmax mask."""
    P, topk = 8, 2
    tensors, scores = bench.op_inputs(2, 2, 20, P, 16, torch.float32, CPU)
    tensors = [t.detach() for t in tensors]
    pool, length = bench.op_pool_layout(P)
    mask = reference_mask(scores, pool, topk, topk, length, length, num_prefix=1)
    expected = {renormalize: tcpa_attention_ref(*fp64(tensors), mask, renormalize=renormalize).float()
                for renormalize in (False, True)}
    for method, renormalize in [("sdpa_bool_mask", True), ("flex_attention", True), ("tcpa_fused", False),
                                ("torch_backend", False)]:
        out = bench.op_forward(method, tensors, scores, topk)()
        torch.testing.assert_close(out, expected[renormalize], msg=lambda m, n=method: f"{n}: {m}")


GPU_MODEL_SETTINGS = sorted({(m, s) for m, s, _ in test_model.GPU_MODELS}
                            | {(profile.CUDA_DEFAULTS["model"], s) for s in profile.CUDA_DEFAULTS["sweep_img"]}
                            | {(test_sweep.GPU_BASE["model_name"], v) for a, v, _ in test_sweep.GPU_AXES
                               if a == "img_size"})
GPU_POOL_SIZES = profile.CUDA_DEFAULTS["sweep_pool"] + [v for a, v, _ in test_sweep.GPU_AXES if a == "pool_size"]


@pytest.mark.parametrize("method", bench.MODEL_METHODS)
@pytest.mark.parametrize("model_name, img_size", GPU_MODEL_SETTINGS)
def test_gpu_model_runs(model_name, img_size, method):
    pool_size = max(GPU_POOL_SIZES)  # the largest pools any GPU run asks for
    model = bench.build_model(method, model_name=model_name, img_size=img_size, pool_size=pool_size, topk=10,
                              device=CPU)
    bench.train_step(model, torch.randn(1, 3, img_size, img_size), torch.tensor([3]), torch.float32)()


def test_tuning_procedure_runs_and_candidates_agree(tmp_path):
    """benchmarks/tune.py's GPU procedure at its CPU smoke shape: every candidate gives the table's result."""
    report = tune.main(["--smoke", "--out", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == [f"tune-{bench.device_slug(CPU)}.json"]
    for kernel in ("fwd", "bwd"):
        rows = report["shapes"][0]["kernels"][kernel]["candidates"]
        assert len(rows) >= 2 and all(row.get("ok") for row in rows), rows
