"""benchmarks/census.py: exact counts and bytes on a hand-checked module, a small ViT per method, small Hugging Face
and open_clip models per method (structure), the summary across families, the CLI."""

import json

import pytest
import torch

from benchmarks import census as c

TINY = dict(model_name="vit_tiny_patch16_224", batch=2, img=32)
METHODS = ("no_prompts", "vpt_deep", "tcpa_fused")


@torch.library.custom_op("census_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_ops_counted_and_excluded():
    aten = torch.ops.aten
    for op in (aten.view.default, aten._unsafe_view.default, aten.t.default, aten.expand.default,
               aten.detach.default, aten.slice.Tensor, aten.unbind.int, aten.unsqueeze_.default,
               aten.empty_like.default, aten.promote_types.default):
        assert not c.is_counted(op), op
    for op in (aten._to_copy.default, aten.copy_.default, aten.clone.default, aten.mm.default,
               torch.ops.census_test.twice.default):
        assert c.is_counted(op), op


def test_linear_relu_exact():
    """Linear(4, 3) -> ReLU -> sum on x [2, 4] (fp32, x needs no grad). The step dispatches t, detach, expand
    and view too (views: not counted). Bytes are 4 * elements of every tensor argument and result (an expanded
    tensor: the elements it addresses)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    r = c.count_step(model, (torch.randn(2, 4),), lambda m, x: m(x).sum())
    got = {(row["phase"], row["op"]): (row["count"], row["bytes"]) for row in r["per_op"]}
    assert got == {
        ("forward", "aten::addmm"): (1, 4 * (3 + 8 + 12 + 6)),  # bias, x, W^T -> out [2, 3]
        ("forward", "aten::relu"): (1, 4 * (6 + 6)),
        ("forward", "aten::sum"): (1, 4 * (6 + 1)),
        ("backward", "aten::ones_like"): (1, 4 * (1 + 1)),  # the loss's grad seed
        ("backward", "aten::threshold_backward"): (1, 4 * (1 + 6 + 6)),  # grad (a scalar expanded: 1), relu out
        ("backward", "aten::mm"): (1, 4 * (6 + 8 + 12)),  # grad^T [3, 2] @ x [2, 4] -> dW [3, 4]
        ("backward", "aten::sum.dim_IntList"): (1, 4 * (6 + 3)),  # d bias
    }
    assert r["ops"] == {"forward": 3, "backward": 4}
    assert r["bytes"] == {"forward": 192, "backward": 200}
    assert r["saved_bytes"] == 4 * 6  # relu's output; x and W (input, parameter) are left out


def test_broadcast_dimensions_count_once():
    weight = torch.ones(3, 5)
    assert c._nbytes([weight.expand(7, 3, 5), torch.ones(2, 3)]) == 4 * (15 + 6)
    assert c._nbytes([torch.ones(4, 1).expand(4, 6), weight.t()]) == 4 * (4 + 15)


@pytest.fixture(scope="module")
def tiny():
    return {m: c.census(m, **TINY) for m in METHODS}


def test_small_vit_every_method(tiny):
    for method, r in tiny.items():
        assert all(r["ops"][p] > 0 and r["bytes"][p] > 0 for p in c.PHASES), method
        assert r["saved_bytes"] > 0, method
    for phase in c.PHASES:  # VPT-deep carries 36 more tokens through every block
        assert tiny["vpt_deep"]["bytes"][phase] > tiny["no_prompts"]["bytes"][phase]
    assert tiny["vpt_deep"]["saved_bytes"] > tiny["no_prompts"]["saved_bytes"]
    custom = {row["phase"] for row in tiny["tcpa_fused"]["per_op"] if row["op"].startswith("tcpa_kernels::")}
    assert custom == set(c.PHASES)  # the kernels are counted as custom ops, not traced through
    assert not any(row["op"].startswith("tcpa_kernels::") for row in tiny["no_prompts"]["per_op"])


def test_growth_and_report(tiny):
    rows = c.growth(tiny["tcpa_fused"], tiny["no_prompts"], top=3)
    assert 3 <= len(rows) <= 6 and all(r["count"] > 0 or r["bytes"] > 0 for r in rows)
    assert [r["bytes"] for r in rows] == sorted((r["bytes"] for r in rows), reverse=True)
    assert any(r["op"].startswith("tcpa_kernels::") for r in c.growth(tiny["tcpa_fused"], tiny["no_prompts"], 100))
    report = c.format_report(tiny, top=3)
    assert all(f"| {m} |" in report for m in METHODS) and "tcpa_fused: ops that grew most" in report


def small_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=100,
                                               attn_implementation="sdpa"))


def small_open_clip_tower():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=8)


@pytest.fixture(scope="module")
def other_families():
    """Each method on a 2-layer Hugging Face ViT and a 2-layer open_clip vision tower (batch 2, 16 px)."""
    pytest.importorskip("transformers", minversion="5.18")
    pytest.importorskip("open_clip")
    factories = {"hf": small_hf_vit, "open_clip": small_open_clip_tower}
    return ({name: c.family(f()) for name, f in factories.items()},
            {name: {m: c.census(m, f, batch=2, img=16) for m in METHODS} for name, f in factories.items()})


def test_other_families_every_method(other_families):
    families, results = other_families
    assert families == {"hf": "Hugging Face", "open_clip": "open_clip"}
    for name, per_method in results.items():
        for method, r in per_method.items():
            assert all(r["ops"][p] > 0 and r["bytes"][p] > 0 for p in c.PHASES) and r["saved_bytes"] > 0, (name, method)
        # no_prompts: the gradient required at the patch embedding crosses both layers' attention backward
        attention_bwd = sum(row["count"] for row in per_method["no_prompts"]["per_op"]
                            if row["phase"] == "backward" and "attention" in row["op"])
        assert attention_bwd == 2, name
        custom = {row["phase"] for row in per_method["tcpa_fused"]["per_op"] if row["op"].startswith("tcpa_kernels::")}
        assert custom == set(c.PHASES), name
        report = c.format_report(per_method, top=2)
        assert all(f"| {m} |" in report for m in METHODS), name


def test_summary_against_each_models_own_no_prompts(other_families, tiny):
    families, results = other_families
    results, families = {"timm": tiny, **results}, {"timm": "timm Block", **families}
    rows = c.summary(results, families)
    assert [r["model"] for r in rows] == ["timm", "hf", "open_clip"]
    for row in rows:
        per_method = results[row["model"]]
        tcpa, vpt = (c.ratios(per_method[m], per_method["no_prompts"]) for m in ("tcpa_fused", "vpt_deep"))
        assert (row["tcpa_ops"], row["tcpa_bytes"], row["vpt_ops"], row["vpt_bytes"]) == (
            tcpa["ops"], tcpa["bytes"], vpt["ops"], vpt["bytes"])
        assert (row["target_ops"], row["target_bytes"]) == c.TARGETS.get(row["family"], c.OTHER_TARGET)
        assert row["met"] == (tcpa["ops"] <= row["target_ops"] and tcpa["bytes"] <= row["target_bytes"]
                              and tcpa["ops"] < vpt["ops"] and tcpa["bytes"] < vpt["bytes"])
    assert rows[0]["target_ops"] == 1.05 and rows[1]["target_bytes"] == 1.01
    table = c.format_summary(rows)
    assert all(f"| {name} | {families[name]} |" in table for name in results)


def test_cli_json(tmp_path, capsys):
    """Every method, tcpa_dense included, on timm's 6-block test ViT (width 64) to stay fast."""
    path = tmp_path / "census.json"
    c.main(["--model", "test_vit", "--batch", "2", "--img", "32", "--methods", ",".join(c.METHODS),
            "--top", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert list(data["results"]) == list(c.METHODS) and set(data["ratios"]) == set(c.METHODS)
    assert data["ratios"]["no_prompts"] == {"ops": 1.0, "bytes": 1.0, "saved_bytes": 1.0}
    assert "| tcpa_dense |" in capsys.readouterr().out


def test_cli_rejects_bad_values(capsys):
    for argv, option in ((["--methods", "no_prompts,vpt"], "--methods"), (["--batch", "0"], "--batch"),
                         (["--top", "-1"], "--top"), (["--model", "nope"], "--model"),
                         (["--all-families", "--model", "test_vit"], "--all-families"),
                         (["--model", "hf_vit_base_patch16_224", "--methods", "no_prompts,tcpa_dense"], "--methods"),
                         (["--model", "eva02_base_patch14_224", "--methods", "tcpa_dense"], "--methods")):
        with pytest.raises(SystemExit) as exit_info:
            c.parse_args(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err, option


def test_tcpa_train_step_meets_the_census_contract():
    """docs/how-it-works.md, 'Targets' at its own setting (ViT-B/16, batch 128, 224 px, bf16 autocast, pools 18+18, k
    10): the fused TCPA step dispatches <= 1.25x the no-prompt model's ops, moves <= 1.03x its bytes, saves <= 1.02x its
    bytes for backward, and stays below VPT-deep in ops and bytes. (Fake tensors: seconds on a CPU.)"""
    results = {m: c.census(m) for m in METHODS}
    fused = c.ratios(results["tcpa_fused"], results["no_prompts"])
    vpt = c.ratios(results["vpt_deep"], results["no_prompts"])
    assert fused["ops"] <= 1.25 and fused["bytes"] <= 1.03 and fused["saved_bytes"] <= 1.02, fused
    assert fused["ops"] < vpt["ops"] and fused["bytes"] < vpt["bytes"], (fused, vpt)
