"""benchmarks/bank.py: the census and host measurements' structure at a tiny size (never its times)."""

import statistics

import pytest
import torch

from benchmarks import bank


def test_census_counts_the_mixed_single_and_separate_steps():
    result = bank.measure_census(tasks=2, batch=4, img=32, dtype=torch.float32, model_name="vit_tiny_patch16_224")
    single, mixed, separate = result["single_task"], result["mixed"], result["separate"]
    assert all(f["ops"] > 0 and f["bytes"] > 0 for f in (single, mixed, separate))
    assert mixed["ops"] > single["ops"]  # the bank's per-task reductions, heads and loss weights
    assert separate["ops"] == 2 * (separate["ops"] // 2) and separate["ops"] > mixed["ops"]  # two whole steps
    assert result["ratios"]["mixed"]["ops"] == mixed["ops"] / single["ops"]


def test_host_times_every_step_and_restores_the_kernels():
    import triton

    from tcpa_kernels.ops import _attention_kernels

    result = bank.measure_host(tasks=2, rounds=2, steps=1, warmup=0, depth=1)
    assert set(result["median_ms"]) == {"mixed", "single_task", "one_task_bank"}
    assert all(t > 0 for t in result["median_ms"].values())
    rounds = result["round_medians_ms"]
    assert result["ratio"] == statistics.median(a / b for a, b in zip(rounds["mixed"], rounds["single_task"]))
    assert any(isinstance(v, triton.runtime.KernelInterface) for v in vars(_attention_kernels).values())


def test_time_runs_every_step_and_ratio():
    """``--time`` (for a GPU) at a tiny size on the CPU: every step timed, the ratios of its medians."""
    result = bank.measure_time(2, 4, torch.device("cpu"), img=32, dtype=torch.float32,
                               model_name="vit_tiny_patch16_224", reps=1)
    modes = [f"{mode}_{run}" for mode in ("train", "eval")
             for run in ("mixed", "mixed_pools", "single_task", "separate")]
    assert sorted(result["ms"]) == sorted(modes) and all(f["median"] > 0 for f in result["ms"].values())
    assert result["mixed_over"]["train_separate"] == (result["ms"]["train_mixed"]["median"]
                                                      / result["ms"]["train_separate"]["median"])
    assert result["mixed_over"]["eval_pools_over_mixed"] == (result["ms"]["eval_mixed_pools"]["median"]
                                                             / result["ms"]["eval_mixed"]["median"])


def test_cli_rejects_bad_values(capsys):
    for argv, option in ((["--tasks", "3", "--batch", "8"], "--batch"), (["--tasks", "0"], "--tasks")):
        with pytest.raises(SystemExit) as exit_info:
            bank.parse_args(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err, option

