"""benchmarks/host_instructions.py: the ratios and report, the counted step without valgrind, the refusals (the
counts themselves need valgrind and minutes: never run here)."""

import pytest

from benchmarks import host_instructions


def test_ratios_and_report():
    counted = {"instructions_per_step": {"no_prompts": 2e7, "tcpa": 1.8e7}, "ratios": {}}
    per_step = counted["instructions_per_step"]
    counted["ratios"] = {m: {"vs_no_prompts": n / per_step["no_prompts"], "vs_vpt_deep": None}
                         for m, n in per_step.items()}
    report = host_instructions.format_report(counted).splitlines()
    assert report[2] == "| no_prompts | 20.00 | 1.000x | - |"
    assert report[3] == "| tcpa | 18.00 | 0.900x | - |"


def test_the_counted_process_runs_its_steps_without_valgrind(monkeypatch):
    """Outside valgrind the client requests do nothing: the process's part runs as it would under it (here on one
    block), collection turned on around the counted steps only, the kernels restored after it."""
    import torch
    import triton

    from benchmarks import host
    from tcpa_kernels.ops import _attention_kernels

    launches_at_toggles = []
    monkeypatch.setattr(torch._C, "_valgrind_toggle", lambda: launches_at_toggles.append(host._NoLaunch.launches))
    host_instructions.child("tcpa", steps=2, warmup=1, depth=1)
    on, off = launches_at_toggles
    assert off - on == 2 * 6  # two stubbed steps of one block: 3 launches each way
    assert any(isinstance(v, triton.runtime.KernelInterface) for v in vars(_attention_kernels).values())


def test_refusals(monkeypatch, capsys):
    monkeypatch.setattr(host_instructions.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="valgrind: not found on PATH"):
        host_instructions.count(["tcpa"])
    for argv, option in ((["--methods", "tcpa,vpt"], "--methods"), (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit) as exit_info:
            host_instructions.main(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err, option
