"""The fine-tuning CLI on a tiny synthetic ImageFolder (and Fashion-MNIST when Debian's package is installed)."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tcpa_kernels import data, finetune

# average pooling: a random (unpretrained) backbone's CLS output carries little of the image
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "16",
        "--model-kwargs", json.dumps({"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                      "global_pool": "avg"})]


def make_image_folder(root, per_class=(8, 4)):
    """Two classes that differ in colour (red or blue channel bright), with noise: position-free, so even a random
    backbone's pooled features separate them."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for label, name in enumerate(("blue", "red")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[..., 2 if label == 0 else 0] += 150
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=10, global_pool="avg")
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("method", ["tcpa", "vpt", "linear"])
def test_overfits_small_batch_and_checkpoint_reloads(tmp_path, folder, weights, method):
    out = tmp_path / method
    common = ["--data", str(folder), "--weights", str(weights), "--batch-size", "16", "--quiet", *TINY]
    args = ["--method", method, "--epochs", "30", "--lr", "1e-2", "--warmup-epochs", "0", "--pool-size", "4",
            "--topk", "2", "--random-epochs", "2", "--prompt-dropout", "0", "--out", str(out), *common]
    assert finetune.main(args) == 0
    log = json.loads((out / "log.json").read_text())
    losses = [h["train_loss"] for h in log["history"]]
    assert losses[-1] < 0.5 * losses[0], losses  # one fixed batch of 16 images: it must overfit
    assert {"log.csv", "log.json", "curves.png", "checkpoint.safetensors"} <= {p.name for p in out.iterdir()}

    evaluated = finetune.train(finetune.parse_args(
        ["--eval-only", "--checkpoint", str(out / "checkpoint.safetensors"), "--out", str(tmp_path / "eval"),
         *common]))
    assert evaluated["val_acc"] == log["history"][-1]["val_acc"]
    assert evaluated["val_loss"] == pytest.approx(log["history"][-1]["val_loss"], rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    values = [finetune.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.skipif(not data.fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_smoke(tmp_path):
    ds = data.fashion_mnist("val", 16, classes=[9, 5])
    assert len(ds) == 2000 and set(ds.labels.tolist()) == {0, 1} and ds.classes == ["ankle-boot", "sandal"]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    args = ["--data", "fashion-mnist", "--classes", "5", "9", "--train-limit", "64", "--val-limit", "64",
            "--method", "tcpa", "--epochs", "1", "--batch-size", "32", "--pool-size", "3", "--topk", "2",
            "--out", str(tmp_path), "--quiet", *TINY]
    assert finetune.main(args) == 0
    assert 0.0 <= json.loads((tmp_path / "log.json").read_text())["val_acc"] <= 1.0


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        data.read_idx(path)


def test_bad_arguments_exit_2(tmp_path, folder, weights, capsys):
    def fails(args, message):
        with pytest.raises(SystemExit) as info:
            finetune.main(args)
        assert info.value.code == 2
        assert message in capsys.readouterr().err

    fails(["--data", str(tmp_path / "missing"), *TINY], "--data: expected 'fashion-mnist' or a directory")
    fails(["--data", str(folder), "--model", "resnet_nope"], "--model: expected a timm model name")
    fails(["--data", str(folder), "--weights", str(tmp_path / "none.pth"), *TINY], "--weights: file not found")
    fails(["--data", str(folder), "--eval-only", *TINY], "--checkpoint: required with --eval-only")
    fails(["--data", str(folder), "--topk", "30", *TINY], "--topk: expected <= --pool-size (18), got 30")
    # a checkpoint trained with another model configuration
    out = tmp_path / "run"
    finetune.main(["--data", str(folder), "--method", "linear", "--epochs", "1", "--out", str(out), "--quiet", *TINY])
    other = TINY[:-1] + [json.dumps({"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2,
                                     "global_pool": "avg"})]
    fails(["--data", str(folder), "--eval-only", "--checkpoint", str(out / "checkpoint.safetensors"), *other],
          "--checkpoint: trained with another config")
