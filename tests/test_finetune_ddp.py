"""The fine-tuning CLI under torchrun: 2 CPU processes over gloo on a tiny ImageFolder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import tcpa_kernels as tk
from tcpa_kernels import finetune
from tests.test_finetune import MODEL_KWARGS, QUICK, TINY, evaluate, make_image_folder

# runs the CLI as `-m tcpa_kernels.finetune` does and then saves this rank's trained parameters
RANK_DUMP = """
import os, sys, torch
from tcpa_kernels import finetune
built, add_method = [], finetune.add_method
finetune.add_method = lambda *a, **k: built.append(add_method(*a, **k)) or built[-1]
code = finetune.main(sys.argv[2:])
params = {n: p.detach() for n, p in built[0].named_parameters() if p.requires_grad}
torch.save(params, os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".pt"))
sys.exit(code)
"""


def test_torchrun_two_processes(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=(8, 5))
    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=16, **MODEL_KWARGS).state_dict(), weights)
    script, out = tmp_path / "rank_dump.py", tmp_path / "run"
    script.write_text(RANK_DUMP)
    # 2 epochs: random selection (DDP told of the keys' missing gradients), then top-k; 9 val images: 5 + 4
    args = ["--data", folder, "--weights", weights, "--out", out, "--quiet", *TINY, *QUICK, "--epochs", 2,
            "--val-limit", 9]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path), *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = safetensors.torch.load_file(out / "last.safetensors")
    assert ranks[0].keys() == ranks[1].keys() == saved.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], saved[k]) for k in saved)
    tk.load_prompts(timm.create_model("vit_tiny_patch16_224", img_size=16, **MODEL_KWARGS), out / "last.safetensors")
    log = json.loads((out / "log.json").read_text())
    assert len(log["history"]) == 2
    assert finetune.read_meta(out / "last.safetensors", "")["batch_per_process"] == 4
    # validation summed over both processes equals one process's over all 9 images
    evaluated = evaluate(out / "last.safetensors", "--data", folder, "--weights", weights, "--val-limit", 9)
    assert evaluated["val_acc"] == log["val_acc"]
    assert evaluated["val_loss"] == pytest.approx(log["val_loss"], rel=1e-5)


def test_batch_size_must_divide_over_the_processes(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "data")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", str(tmp_path / "data"), "--random-init", "--batch-size", "7", *TINY])
    assert info.value.code == 2
    assert "--batch-size: expected a multiple of the 2 processes (each takes an equal share), got 7" in \
        capsys.readouterr().err
