"""The profiling CLI and the benchmark harness on a tiny CPU setting (figures are not checked: never assert on time)."""

import json

import pytest
import torch

from tcpa_kernels import bench, profile


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    args = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
            "--pool-size", "3", "--topk", "2", "--reps", "2", "--sweep-batch", "1", "2", "--sweep-pool", "2",
            "--sweep-img", "--out", str(tmp_path)]
    assert profile.main(args) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert set(result["main"]) == set(bench.MODEL_METHODS)
    assert {"device", "torch", "triton"} <= set(result["environment"])
    assert result["memory_metric"] == "cpu_saved_for_backward_mb" and result["settings"]["backend"] == "torch"
    assert len(result["sweep"]) == 3 * len(bench.MODEL_METHODS)
    assert set(result["ratios"]) == {"no_prompts", "vpt_deep", "tcpa_dense"}
    for figures in result["main"].values():
        assert figures["train_ms"]["median"] > 0 and figures["inference_ms"]["median"] > 0
        assert len(figures["train_ms"]["samples"]) == 2 and figures["train_memory_mb"] > 0
    assert (tmp_path / "profile.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "tcpa_fused" in table and "fused/this" in table and "saved for backward (MB)" in table


# --------------------------------------------------------------- the CLI on scripted times (no model is run)

TRAIN_MS = {"no_prompts": [10, 10, 10, 10, 10], "vpt_deep": [40, 40, 40, 40, 40],
            "tcpa_dense": [30, 10, 30, 50, 30],  # one stray round each way: the IQR stays 0, min-max is wide
            "tcpa_fused": [20, 20, 22, 24, 26]}  # IQR 4 ms = 18 % of the 22 ms median: warned
MEMORY_MB = {"no_prompts": 10.0, "vpt_deep": 40.0, "tcpa_dense": 30.0, "tcpa_fused": 11.0}


class FakeStep:
    """A train step or an inference call of one method that logs itself; ``timer`` returns its scripted time."""

    def __init__(self, log, method, kind):
        self.log, self.method, self.kind = log, method, kind

    def __call__(self):
        self.log.append((self.method, self.kind))


@pytest.fixture
def scripted(monkeypatch, tmp_path, capsys):
    """Runs ``profile.main`` with fake models: returns (log of every step call, JSON, stdout). Round r of a method
    takes TRAIN_MS[method][r] ms per train step (r mod 5 past the main comparison) and 1 ms per inference call."""
    log, rounds = [], {}

    def timer(step, device):
        step()
        key = (step.method, step.kind)
        rounds[key] = rounds.get(key, -1) + 1
        return TRAIN_MS[step.method][rounds[key] % 5] if step.kind == "train" else 1.0

    monkeypatch.setattr(bench, "build_model", lambda method, **setting: method)
    monkeypatch.setattr(bench, "train_step", lambda method, images, labels, dtype: FakeStep(log, method, "train"))
    monkeypatch.setattr(bench, "inference_step", lambda method, images, dtype: FakeStep(log, method, "infer"))
    monkeypatch.setattr(bench, "peak_memory_mb", lambda step, device: (step(), MEMORY_MB[step.method])[1])
    timed = bench.interleaved_samples
    monkeypatch.setattr(bench, "interleaved_samples", lambda steps, device, reps: timed(steps, device, reps, timer))

    def run(*options):
        rounds.clear(), log.clear()
        assert profile.main(["--device", "cpu", "--img-size", "64", "--batch-size", "8", "--out", str(tmp_path),
                             *options]) == 0
        return log, json.loads((tmp_path / "profile.json").read_text()), capsys.readouterr().out

    return run


def test_rounds_interleave_the_methods_in_rotating_order(scripted):
    log, _, _ = scripted("--reps", "3", "--no-sweep")
    methods = list(bench.MODEL_METHODS)
    warmup = [(m, kind) for m in methods for kind in ("train", "train", "infer")]  # optimizer state, memory, infer
    rotated = [methods[r:] + methods[:r] for r in range(3)]
    assert log == warmup + [(m, kind) for kind in ("train", "infer") for order in rotated for m in order]


def test_summarize_median_spread_and_noisy():
    figure = bench.summarize([13, 10, 30, 11, 12])
    assert figure == {"median": 12, "min": 10, "max": 30, "q1": 11, "q3": 13, "iqr_rel": 2 / 12, "range_rel": 20 / 12,
                      "samples": [13, 10, 30, 11, 12]}
    assert bench.noisy(figure)  # IQR 17 % of the median
    assert not bench.noisy(bench.summarize([100, 101, 102, 103, 300]))  # one stray sample: IQR 2 %
    assert bench.summarize([5.0])["iqr_rel"] == 0


def test_json_has_medians_spreads_and_ratios_per_round(scripted):
    threads = torch.get_num_threads()
    _, result, _ = scripted("--reps", "5", "--no-sweep")
    assert torch.get_num_threads() == threads and result["settings"]["threads"] == 1  # one while measuring
    fused, dense = result["main"]["tcpa_fused"], result["main"]["tcpa_dense"]
    assert fused["train_ms"] == bench.summarize(TRAIN_MS["tcpa_fused"]) and fused["train_memory_mb"] == 11.0
    assert dense["train_ms"]["median"] == 30 and dense["train_ms"]["iqr_rel"] == 0 and dense["train_ms"]["max"] == 50
    assert result["main"]["no_prompts"]["inference_ms"]["samples"] == [1.0] * 5
    ratio = result["ratios"]["no_prompts"]
    assert ratio["train_ms"]["samples"] == [2.0, 2.0, 2.2, 2.4, 2.6] and ratio["train_ms"]["median"] == 2.2
    assert ratio["inference_ms"]["median"] == 1.0 and ratio["train_memory_mb"] == 1.1
    assert result["settings"] | {"reps": 5, "backend": "torch", "img_size": 64, "batch_size": 8} == result["settings"]
    assert result["ratio"] == profile.RATIO_MEANING and "iqr_rel" in result["spread"]["warned_above"]
    assert result["warnings"][0] == "tcpa_fused train step time (ms): IQR 18% of the median, over 10%"
    assert len(result["warnings"]) == 2  # that figure, then what to do


def test_console_explains_the_ratio_and_warns_of_spread(scripted):
    _, _, out = scripted("--reps", "5", "--no-sweep")
    assert "vit_tiny_patch16_224, 64 px, batch 8, fp32, CPU" in out and " 1 thread, backend torch" in out
    assert "fused/this = fused TCPA's figure / this method's" in out and "below 1, fused TCPA is faster" in out
    assert "tcpa_fused   22.00 [20.00-26.00] 18%" in out
    assert "no_prompts   2.200 [2.000-2.600] 18%" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings[0] == "warning: tcpa_fused train step time (ms): IQR 18% of the median, over 10%"
    assert not any("tcpa_dense" in line for line in warnings)


@pytest.mark.parametrize("methods", [bench.MODEL_METHODS, ("no_prompts", "tcpa_fused")])
def test_plot_states_the_setting_and_keeps_one_colour_per_method(scripted, methods):
    from matplotlib.colors import to_rgba
    from matplotlib.container import BarContainer

    _, result, _ = scripted("--reps", "5", "--methods", *methods, "--sweep-batch", "2", "4", "--sweep-pool", "4",
                            "--sweep-img")
    fig = profile.build_figure(result)
    assert fig.get_suptitle().startswith("vit_tiny_patch16_224, 64 px, batch 8, fp32, CPU")
    assert "backend torch" in fig.get_suptitle() and "error bars min-max" in fig.get_suptitle()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "train step time (ms)", "inference time (ms)", "saved for backward (MB)",
        "train step time (ms) vs batch size", "train step time (ms) vs pool size (entries per pool)"]
    for ax in panels[:3]:  # bars, in the order of the methods, with error bars
        assert [bar.get_facecolor() for bar in ax.patches] == [to_rgba(profile.COLORS[m]) for m in methods]
    bars = next(c for c in panels[0].containers if isinstance(c, BarContainer))  # error bars: min to max
    assert [tuple(segment[:, 1]) for segment in bars.errorbar.lines[2][0].get_segments()] == [
        (min(TRAIN_MS[m]), max(TRAIN_MS[m])) for m in methods]
    for ax in panels[3:]:  # one line with error bars per method
        assert {line.get_label(): to_rgba(line.lines[0].get_color()) for line in ax.containers} == {
            m: to_rgba(profile.COLORS[m]) for m in methods}
    assert profile.COLORS["tcpa_fused"] == "C3"  # whatever methods ran


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
    (["--threads", "-1"], "--threads: expected an int >= 0, got -1"),
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

    monkeypatch.setattr(bench, "measure_models", measure)
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


def test_benchmark_session_ends_with_the_headline_ratios():
    from benchmarks.conftest import headline_table

    def row(name, ms, memory_mb, samples, **rates):
        return {"name": name, "ms": ms, "memory_mb": memory_mb, "ms_spread": bench.summarize(samples), **rates}

    table = headline_table([row("op/vit_b/tcpa_fused/fwd", 1.0, 2.0, [1, 1, 1], tflops=10.0, gbps=100.0),
                            row("op/vit_b/sdpa_flash/fwd", 2.0, 4.0, [2, 2, 3]),  # IQR 25 % of the median
                            row("model/vit_s/b8/tcpa_fused/train", 30.0, 11.0, [30, 30, 30]),
                            row("model/vit_s/b8/no_prompts/train", 10.0, 10.0, [10, 10, 10])]).splitlines()
    assert table[0].startswith("fused TCPA's figure / the baseline's, time (memory): below 1, fused TCPA is faster")
    assert table[2].split() == ["vit_b/fwd", "1.000", "10", "100", "2.00", "0.50", "(0.50)*", "-", "-"]
    assert table[4].split() == ["vit_s/b8/train", "30.000", "-", "-", "11.00", "3.00", "(1.10)", "-", "-"]
    assert table[-1].startswith("*: a time behind the ratio spreads over 10%")
    assert headline_table([]) == ""
