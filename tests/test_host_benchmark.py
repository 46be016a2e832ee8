"""benchmarks/host.py: the measurement's structure on a 1-block model, eager and compiled (never its times)."""

import math
import statistics

import pytest
import torch

import tcpa_kernels as tk
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


def test_ratios_are_the_rounds_ratios_median_in_the_same_mode(measured):
    results, ratios = measured["results"], measured["ratios"]
    for method in host.METHODS:
        for mode in host.MODES:
            for base in ("no_prompts", "vpt_deep"):
                rounds = zip(results[method][mode]["round_medians_ms"], results[base][mode]["round_medians_ms"])
                expected = statistics.median(a / b for a, b in rounds)
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
                         (["--dtype", "fp16"], "--dtype"), (["--methods", "tcpa_triton_dispatch"], "--methods"),
                         (["--launch", "driver"], "TRITON_INTERPRET=1")):  # the suite imports triton interpreted
        with pytest.raises(SystemExit) as exit_info:
            host.parse_args(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err, option


def test_driver_launch_refused_in_an_interpreted_process():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=0"):
        host.measure(["tcpa"], launch="driver")


def test_ablations_remove_their_part_and_restore_the_pass():
    """tcpa_constant_kv runs no prompt K/V pass (its prompts get no gradient), tcpa_frozen_keys no key gradient; the
    pass is the library's again afterwards. On one block, where nothing before the block trains: the prompt K/V
    pass is one launch each way, which tcpa_constant_kv drops, with the attention's backward launch (nothing before
    the block needs its gradient); tcpa_frozen_keys drops the matching's backward launch."""
    from tcpa_kernels import _forward, _prompt_kv

    measured = host.measure(("tcpa",) + host.ABLATIONS, rounds=1, steps=1, warmup=0, depth=1)
    launches = {m: measured["results"][m]["eager"]["launches_per_step"] for m in ("tcpa",) + host.ABLATIONS}
    assert launches == {"tcpa": 6, "tcpa_constant_kv": 3, "tcpa_frozen_keys": 5}
    assert _forward.all_layers_kv is _prompt_kv.all_layers_kv
    model = host.build_model("tcpa_constant_kv", depth=1)
    prompts = model.blocks[0].tcpa
    with host.constant_prompt_kv([model]):
        loss = model(torch.randn(1, 3, 16, 16)).sum() + tk.get_matching_loss(model)
    grads = torch.autograd.grad(loss, [prompts.prompts_img, prompts.keys_img], allow_unused=True)
    assert grads[0] is None and grads[1] is not None
    frozen = host.build_model("tcpa_frozen_keys", depth=1)
    assert not frozen.blocks[0].tcpa.keys_cls.requires_grad and frozen.blocks[0].tcpa.prompts_cls.requires_grad

