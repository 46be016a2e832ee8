"""benchmarks/host.py: the measurement's structure on a 1-block model, eager and compiled (never its times)."""

import math

import pytest

from benchmarks import host


@pytest.fixture(scope="module")
def measured():
    return host.measure(host.METHODS, host.MODES, rounds=2, steps=2, warmup=1, depth=1, compile_backend="eager")


def test_every_method_and_mode_with_positive_figures(measured):
    results = measured["results"]
    assert set(results) == set(host.METHODS) and all(set(r) == set(host.MODES) for r in results.values())
    for per_mode in results.values():
        for r in per_mode.values():
            assert len(r["round_medians_ms"]) == 2 and all(t > 0 for t in r["round_medians_ms"])
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert results["no_prompts"]["eager"]["launches_per_step"] == 0  # no Triton kernel without prompts
    assert results["tcpa"]["eager"]["launches_per_step"] > 0  # the stubs were called, not the kernels
    assert measured["compile_backend"] == "eager" and measured["kernels_stubbed"] > 0


def test_ratios_are_the_medians_over_the_same_mode(measured):
    results, ratios = measured["results"], measured["ratios"]
    for method in host.METHODS:
        for mode in host.MODES:
            for base in ("no_prompts", "vpt_deep"):
                expected = results[method][mode]["median_ms"] / results[base][mode]["median_ms"]
                assert math.isclose(ratios[method][mode][f"vs_{base}"], expected)
    assert ratios["no_prompts"]["eager"]["vs_no_prompts"] == 1.0


def test_report_and_kernels_restored(measured):
    import triton

    from tcpa_kernels.ops import _attention_kernels

    report = host.format_report(measured).splitlines()
    assert all(any(line.startswith(f"| {m} | {mode}") for line in report) for m in host.METHODS for mode in host.MODES)
    assert report[-1].startswith("tcpa/no_prompts ") and report[-1].endswith("x (eager)")
    kernels = [v for v in vars(_attention_kernels).values() if isinstance(v, triton.runtime.KernelInterface)]
    assert kernels  # the real kernels are back after the measurement


def test_cli_rejects_bad_values(capsys):
    for argv, option in ((["--methods", "tcpa,vpt"], "--methods"), (["--rounds", "0"], "--rounds"),
                         (["--dtype", "fp16"], "--dtype")):
        with pytest.raises(SystemExit) as exit_info:
            host.parse_args(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err, option
