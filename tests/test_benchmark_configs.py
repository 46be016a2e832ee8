"""The GPU benchmark configurations are valid: every op shape and model that benchmarks/ and the tuning script
run on a GPU builds and runs one step here on CPU, at batch 1 and one head (PyTorch backend), so that a GPU
session is not spent finding a configuration error; the GPU run's scripts (benchmarks/headline.py,
benchmarks/kernel_check.py, benchmarks/tune.py) run their whole procedure at their CPU smoke settings. Figures are
not checked."""

import copy
import json

import pytest
import torch

from benchmarks import graphs, headline, kernel_check, test_model, test_op, test_sweep, tune
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
    if step is None:
        pytest.skip(f"{method} has no CPU equivalent")
    grads = step()
    assert all(torch.isfinite(g).all() for g in grads)


def test_op_baselines_compute_what_they_claim():
    """Same inputs, same selection (the reference's top-k rule): SDPA with the bool mask and FlexAttention
    (forward only: no backward on CPU) equal the fp64 reference with renormalize=True, the masked softmax they
    compute; the fused op, the library's PyTorch backend and the published code's eager attention equal it with
    TCPA's post-softmax mask; SDPA without a mask attends to all P+N keys."""
    P, topk = 8, 2
    tensors, scores = bench.op_inputs(2, 2, 20, P, 16, torch.float32, CPU)
    tensors = [t.detach() for t in tensors]
    pool, length = bench.op_pool_layout(P)
    mask = reference_mask(scores, pool, topk, topk, length, length, num_prefix=1)
    expected = {renormalize: tcpa_attention_ref(*fp64(tensors), mask, renormalize=renormalize).float()
                for renormalize in (False, True)}
    expected["all keys"] = tcpa_attention_ref(*fp64(tensors), torch.ones_like(mask)).float()
    for method, semantics in [("sdpa_bool_mask", True), ("flex_attention", True), ("tcpa_fused", False),
                              ("torch_backend", False), ("dense_eager", False), ("sdpa_flash", "all keys")]:
        forward, leaves = bench.op_forward(method, tensors, scores, topk)
        torch.testing.assert_close(forward(), expected[semantics], msg=lambda m, n=method: f"{n}: {m}")
        if method.startswith(("sdpa", "dense")):  # pre-built [B, H, P+N, D] keys and values: prompts first
            assert [t.shape for t in leaves[1:]] == [(2, 2, P + 20, 16)] * 2
            torch.testing.assert_close(leaves[1][:, :, :P], tensors[3].expand(2, -1, -1, -1))


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


def test_tune_procedure_runs_and_candidates_agree(tmp_path):
    """benchmarks/tune.py's GPU procedure at its CPU smoke shapes: every candidate of the attention, the matching and
    the prompt K/V kernels (one dropout mask; one per sample, with the backward's number of partials) gives the
    table's result; the matching has its F.layer_norm reference figures, for each dtype of x."""
    from tcpa_kernels.ops import _prompt_kv_kernels

    launch, groups = copy.deepcopy(_prompt_kv_kernels.LAUNCH), _prompt_kv_kernels.SET_GROUPS
    report = tune.main(["--smoke", "--out", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == [f"tune-{bench.device_slug(CPU)}.json"]
    assert [m["dtype"] for m in report["matching"]] == list(tune.MATCH_SMOKE_DTYPES)
    for kernels in [report["shapes"][0]["kernels"], *(m["kernels"] for m in report["matching"])]:
        for kernel in ("fwd", "bwd"):
            rows = kernels[kernel]["candidates"]
            assert len(rows) >= 2 and all(row.get("ok") for row in rows), rows
    prompt_kv = report["prompt_kv"][0]["kernels"]
    assert list(prompt_kv) == ["shared_mask_fwd", "shared_mask_bwd", "per_sample_fwd", "per_sample_bwd_set_groups"]
    for rows in (r["candidates"] for r in prompt_kv.values()):
        assert len(rows) >= 2 and all(row.get("ok") for row in rows), rows
    assert [row["config"] for row in prompt_kv["per_sample_bwd_set_groups"]["candidates"]] == [[8], [1]]
    assert _prompt_kv_kernels.LAUNCH == launch and _prompt_kv_kernels.SET_GROUPS == groups  # the tables restored
    assert all(m["layer_norm_ms"]["fwd"] > 0 and m["layer_norm_ms"]["bwd"] > 0 for m in report["matching"])


def test_headline_procedure_runs(tmp_path):
    """benchmarks/headline.py at its smoke setting: every op method and mode has figures or says why it cannot run
    here, every model method has its timed train steps, memory, inference time and kernel table, and the §6
    ratios are computed from them."""
    report = headline.main(["--smoke", "--out", str(tmp_path)])
    slug = bench.device_slug(CPU) + "-smoke"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{slug}-headline.json", f"{slug}-kernels.txt"]
    assert json.loads((tmp_path / f"{slug}-headline.json").read_text())["op"] == report["op"]
    assert report["ceilings"]["measured"]["copy_gbps"] > 0
    for method in headline.OP_METHODS:
        for mode in bench.OP_MODES:
            figures = report["op"][f"{method}/{mode}"]
            if method in ("sdpa_efficient", "sdpa_cudnn"):  # CUDA backends
                assert figures == {"skipped": f"no {method} on cpu"}
            else:
                assert figures["ms"] > 0 and figures["memory_mb"] >= 0, (method, mode, figures)
    prefix = f"{headline.SMOKE_MODEL['model_name']}/b{headline.SMOKE_MODEL['batch']}"
    for method in bench.MODEL_METHODS:
        train = report["model"][f"{prefix}/{method}/train"]
        assert train["steps"] == 3 and train["min_ms"] <= train["ms"] <= train["max_ms"] and train["memory_mb"] > 0
        assert report["model"][f"{prefix}/{method}/inference"]["ms"] > 0
        assert report["kernels"][f"model/{prefix}/{method}/train"]
    assert len(report["ratios"]) == len(headline.SPEC_TARGETS)
    assert (tmp_path / f"{slug}-kernels.txt").read_text().count("== ") == 1 + len(bench.MODEL_METHODS)


def test_kernel_check_runs_every_workload():
    """benchmarks/kernel_check.py (what compute-sanitizer runs) at its small shapes: every kernel variant runs."""
    names = kernel_check.main([])
    assert len(names) == 11 and {"mask_shared_atomic", "words_per_sample_renorm1", "vit_lean_per_sample"} <= set(names)


def test_graphs_procedure_runs():
    """benchmarks/graphs.py (eager vs CUDA graphs) at its CPU smoke setting: every method has a train-step and an
    eval figure in both modes, and the ratio is computed from them."""
    report = graphs.run([2], graphs.METHODS, CPU, None, reps=2)
    assert sorted(report["figures"]) == sorted(f"b2/{m}" for m in graphs.METHODS)
    for figures in report["figures"].values():
        for mode in ("eager", "graphs"):
            assert figures[mode]["train_ms"] > 0 and figures[mode]["eval_ms"] > 0
        assert figures["eager_over_graphs"]["train_ms"] == figures["eager"]["train_ms"] / figures["graphs"]["train_ms"]
