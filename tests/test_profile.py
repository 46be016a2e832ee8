"""The profiling CLI and the benchmark harness on a tiny CPU setting (figures are not checked: never assert on time)."""

import json

import pytest
import torch

from tcpa_kernels import bench, profile


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    args = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
            "--pool-size", "3", "--topk", "2", "--reps", "1", "--sweep-batch", "1", "2", "--sweep-pool", "2",
            "--sweep-img", "--out", str(tmp_path)]
    assert profile.main(args) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert set(result["main"]) == set(bench.MODEL_METHODS)
    assert {"device", "torch", "triton"} <= set(result["environment"])
    assert result["memory_metric"] == "cpu_saved_for_backward_mb"
    assert len(result["sweep"]) == 3 * len(bench.MODEL_METHODS)
    assert set(result["ratios"]) == {"no_prompts", "vpt_deep", "tcpa_dense"}
    for figures in result["main"].values():
        assert figures["train_ms"] > 0 and figures["train_memory_mb"] > 0 and figures["inference_ms"] > 0
    assert (tmp_path / "profile.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "tcpa_fused" in table and "fused/this time" in table


def test_dense_baseline_saves_more_for_backward_than_fused():
    """The memory accounting itself: the dense [B,H,P+N,P+N] mask path must hold more activations."""
    figures = {m: bench.measure_model(m, model_name="vit_tiny_patch16_224", img_size=32, batch_size=2, pool_size=4,
                                      topk=2, dtype=torch.float32, device=torch.device("cpu"), reps=1)
               for m in ("tcpa_dense", "tcpa_fused")}
    assert figures["tcpa_dense"]["train_memory_mb"] > figures["tcpa_fused"]["train_memory_mb"]


def test_cpu_memory_counts_only_what_the_call_allocates():
    """Saved tensors that existed before the call (parameters, inputs) are left out, as on CUDA; views of them
    too; tensors the call allocates and saves are counted at their storage size."""
    weight = torch.nn.Parameter(torch.randn(256, 256))  # 256 KiB
    x = torch.randn(256, 256, requires_grad=True)
    cpu = torch.device("cpu")
    assert bench.peak_memory_mb(lambda: (weight * x).sum(), cpu) == 0
    assert bench.peak_memory_mb(lambda: (weight.t() @ x).sum(), cpu) == 0
    assert bench.peak_memory_mb(lambda: (weight.exp() * x).sum(), cpu) == 0.25  # exp's output, saved twice


@pytest.mark.parametrize("bad, message", [
    (["--model", "not_a_model"], "--model: expected a timm model name"),
    (["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
    (["--reps", "0"], "--reps: expected a positive int, got 0"),
    (["--topk", "-1"], "--topk: expected a positive int, got -1"),
    (["--topk", "30"], "--topk: expected 1 <= topk <= --pool-size (18), got 30"),
    (["--pool-size", "33"], "--pool-size: expected an int in [1, 32] (TCPA's two pools share 64 entries), got 33"),
    (["--img-size", "40"], "--img-size: expected a positive multiple of vit_tiny_patch16_224's patch size (16 px), "
                           "got 40"),
    (["--img-size", "8"], "--img-size: expected a positive multiple of vit_tiny_patch16_224's patch size"),
    (["--model", "vit_tiny_r_s16_p8_224", "--img-size", "48"],
     "--img-size: expected a positive multiple of vit_tiny_r_s16_p8_224's patch size (32 px), got 48"),
    (["--sweep-batch", "2", "0"], "--sweep-batch: expected a positive int, got 0"),
    (["--sweep-pool", "-3"], "--sweep-pool: expected an int in [1, 32]"),
    (["--sweep-pool", "40"], "--sweep-pool: expected an int in [1, 32] (TCPA's two pools share 64 entries), got 40"),
    (["--sweep-img", "32", "50"], "--sweep-img: expected a positive multiple of vit_tiny_patch16_224's patch size "
                                  "(16 px), got 50"),
    (["--sweep-img", "0"], "--sweep-img: expected a positive multiple"),
    (["--dtype", "fp64"], "--dtype: expected a dtype that cpu autocast supports, got fp64"),
    (["--out", "file"], "--out: expected a writable folder, got 'file'"),
    (["--out", "file/sub"], "--out: expected a writable folder, got 'file/sub'"),
    (["--out", "taken"], "--out: expected profile.json and profile.png to be files, got a folder taken/profile.json"),
    (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    (["--model", "swin_tiny_patch4_window7_224"], "--model: swin_tiny_patch4_window7_224 cannot be prompted"),
    (["--model", "vit_small_patch16_dinov3", "--methods", "tcpa_dense"],
     "--methods: vit_small_patch16_dinov3 runs no_prompts, vpt_deep, tcpa_fused, got tcpa_dense"),
])
def test_cli_bad_arguments_exit_2_before_measuring(bad, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the --out cases' paths; the default --out is not created here
    (tmp_path / "file").write_text("")
    (tmp_path / "taken" / "profile.json").mkdir(parents=True)
    monkeypatch.setitem(profile.DTYPES, "fp64", torch.float64)  # a dtype CPU autocast lacks

    def measure(*args, **kwargs):
        raise AssertionError("measured before every option was checked")

    monkeypatch.setattr(bench, "measure_model", measure)
    with pytest.raises(SystemExit) as info:
        profile.main(["--device", "cpu", *bad] if "--device" not in bad else bad)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_creates_the_output_folder_up_front_and_checks_only_the_sweeps_it_runs(tmp_path):
    out = tmp_path / "a" / "b"
    args = profile.parse_args(["--device", "cpu", "--sweep-img", "50", "--no-sweep", "--out", str(out)])
    assert out.is_dir()
    assert args.sweep_img == [] and args.methods == list(bench.MODEL_METHODS)


def test_cli_on_a_model_without_the_dense_baseline(tmp_path):
    """A DINOv3 (timm Eva) model: every method but the published dense-mask one, which exists for timm Block only."""
    args = ["--device", "cpu", "--model", "vit_small_patch16_dinov3", "--img-size", "32", "--batch-size", "2",
            "--pool-size", "3", "--topk", "2", "--reps", "1", "--no-sweep", "--out", str(tmp_path)]
    assert profile.main(args) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert list(result["main"]) == ["no_prompts", "vpt_deep", "tcpa_fused"]
    assert set(result["ratios"]) == {"no_prompts", "vpt_deep"}
