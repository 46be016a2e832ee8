"""The fine-tuning CLI on a tiny synthetic ImageFolder (and Fashion-MNIST when Debian's package is installed)."""

import json
import re

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.transforms import Normalize

import tcpa_kernels as tk
from tcpa_kernels import checkpoint, data, finetune

MODEL_KWARGS = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg"}
# average pooling: a random (unpretrained) backbone's CLS output carries little of the image
TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL_KWARGS)]
TINY = [*TINY_MODEL, "--img-size", "16"]
# a short schedule, 2 steps an epoch on the 16 training images: every method
QUICK_ANY = ["--warmup-epochs", "1", "--batch-size", "8"]
# ... with small pools and one random-selection epoch: --method tcpa (the others refuse TCPA's options)
QUICK = [*QUICK_ANY, "--pool-size", "4", "--topk", "2", "--random-epochs", "1"]
TCPA_ONLY = {"tcpa": ["--topk", "2", "--random-epochs", "2"], "vpt": [], "linear": []}
NO_AUGMENTATION = ["--mixup", "0", "--smoothing", "0", "--hflip", "0", "--scale", "1", "1", "--ratio", "1", "1",
                   "--color-jitter", "0"]


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
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, num_classes=10, **MODEL_KWARGS)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def run(*args) -> int:
    return finetune.main([str(a) for a in args])


def evaluate(path, *args) -> dict:
    return finetune.train(finetune.parse_args(["--eval-only", "--checkpoint", str(path), "--quiet",
                                               *[str(a) for a in args]]))


def log(out) -> dict:
    return json.loads((out / "log.json").read_text())


def meta(path) -> dict:
    return checkpoint.read_trainable(path, finetune.CLI_KEY)[0]


@pytest.mark.parametrize("method", ["tcpa", "vpt", "linear"])
def test_overfits_small_batch_and_checkpoints_reload(tmp_path, folder, weights, method):
    out = tmp_path / method
    prompts = ["--pool-size", "4", "--prompt-dropout", "0"] if method != "linear" else []
    args = ["--method", method, "--epochs", "10", "--lr", "1e-2", "--warmup-epochs", "0", *prompts,
            *TCPA_ONLY[method], "--batch-size", "16", "--out", out,
            "--data", folder, "--weights", weights, "--quiet", *NO_AUGMENTATION, *TINY]
    assert run(*args) == 0
    summary = log(out)
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < 0.5 * losses[0], losses  # one fixed batch of 16 images: it must overfit
    assert {p.name for p in out.iterdir()} == {"log.csv", "log.json", "curves.png", "last.safetensors",
                                               "best.safetensors", "last_state.pt"}
    assert meta(out / "last.safetensors")["epoch"] == 10
    assert meta(out / "best.safetensors")["epoch"] == summary["best_epoch"]
    # --eval-only reads the model, method, prompts, classes and data config from the checkpoint
    for name, epoch in (("last", 10), ("best", summary["best_epoch"])):
        evaluated = evaluate(out / f"{name}.safetensors", "--data", folder, "--weights", weights)
        assert evaluated["val_acc"] == summary["history"][epoch - 1]["val_acc"]
        assert evaluated["val_loss"] == pytest.approx(summary["history"][epoch - 1]["val_loss"], rel=1e-5)
    if method != "linear":  # the same file is a save_prompts file: a plain timm model loads it
        model = tk.load_prompts(timm.create_model("vit_tiny_patch16_224", img_size=16, **MODEL_KWARGS),
                                out / "last.safetensors")
        assert model.prompt_state.method == method and model.head.out_features == 2


def test_lr_schedule_warmup_then_cosine():
    values = [finetune.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_recipe_defaults(folder):
    args = finetune.parse_args(["--data", str(folder), "--random-init"])
    recipe = {"lr": 0.004, "weight_decay": 0.1, "batch_size": None, "mixup": 0.8, "epochs": 100, "warmup_epochs": 10,
              "random_epochs": 10, "match_weight": 0.01, "pool_size": 18, "topk": 10, "num_prompts": 36,
              "prompt_dropout": 0.1, "method": "tcpa", "prompt_transform": "none", "fourier_fraction": 1.0,
              "img_size": 224}  # the model's pretrained input size
    assert {k: getattr(args, k) for k in recipe} == recipe
    assert finetune.DEFAULT_BATCH_SIZE == 128  # set at the start of training: at most the training images
    assert re.fullmatch(r"runs/finetune/\d{8}-\d{6}", args.out)


def test_data_config_from_the_model(tmp_path, folder):
    """Normalisation from the model's pretrained config (deit: ImageNet mean/std, bicubic, crop 0.9), the same
    for Fashion-MNIST's tensor path as timm's PIL transform; --eval-only rebuilds a --random-init backbone."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, **MODEL_KWARGS)
    config = data.model_data_config(model, 16)
    assert config["mean"] == list(IMAGENET_DEFAULT_MEAN) and config["std"] == list(IMAGENET_DEFAULT_STD)
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    for size in (16, 40):  # down- and up-sampling
        config = data.model_data_config(model, size)
        ours = data.GreyTransform(config)(images)
        theirs = torch.stack([data.timm_transform(config)(Image.fromarray(a.numpy()).convert("RGB")) for a in images])
        assert ours.shape == theirs.shape == (4, 3, size, size)
        assert (ours - theirs).abs().max() <= 2.01 / 255 / min(IMAGENET_DEFAULT_STD)  # PIL rounds differently
        torch.testing.assert_close(data.GreyTransform(config, hflip=1.0)(images), ours.flip(-1))

    out = tmp_path / "run"
    deit = ["--model", "deit_tiny_patch16_224", "--img-size", "16", "--model-kwargs", json.dumps(MODEL_KWARGS)]
    assert run("--data", folder, "--random-init", *QUICK, "--epochs", 1, "--random-epochs", 0, "--out", out, "--quiet",
               *deit) == 0
    saved = meta(out / "last.safetensors")
    assert saved["data_config"] == data.model_data_config(model, 16) and saved["classes"] == ["blue", "red"]
    assert evaluate(out / "last.safetensors", "--data", folder)["val_acc"] == log(out)["val_acc"]


@pytest.mark.skipif(not data.fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_smoke(tmp_path):
    config = {"input_size": [3, 16, 16], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 0.9, "crop_mode": "center"}
    ds = data.fashion_mnist("val", data.GreyTransform(config), classes=[9, 5])
    assert len(ds) == 2000 and set(ds.labels.tolist()) == {0, 1} and ds.classes == ["ankle-boot", "sandal"]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    out = tmp_path / "run"
    assert run("--data", "fashion-mnist", "--classes", 5, 9, "--train-limit", 64, "--val-limit", 64, "--epochs", 1,
               "--random-epochs", 0, "--warmup-epochs", 0, "--batch-size", 32, "--pool-size", 3, "--topk", 2,
               "--random-init", "--out", out, "--quiet", *TINY) == 0
    assert 0.0 <= log(out)["val_acc"] <= 1.0
    assert evaluate(out / "best.safetensors", "--data", "fashion-mnist", "--val-limit", 64)["val_acc"] == \
        log(out)["val_acc"]  # --eval-only takes the whole split unless --val-limit is given


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        data.read_idx(path)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path, folder, weights, monkeypatch, capsys):
    """Ctrl-C in epoch 2 keeps epoch 1's checkpoint; --resume ends with exactly the uninterrupted run's tensors.
    Epochs 1-2 select prompts at random, validation always by top-k: --eval-only (top-k) of epoch 1's checkpoint
    reports the val accuracy the run logged. Every kind of augmentation is on (their RNGs must resume too)."""
    args = ["--data", folder, "--weights", weights, "--quiet", *TINY, *QUICK, "--epochs", 3, "--random-epochs", 2,
            "--cutmix", 1.0, "--aa", "rand-m9-mstd0.5", "--reprob", 0.25]
    modes = []
    matching_loss = tk.get_matching_loss
    monkeypatch.setattr(tk, "get_matching_loss", lambda m: modes.append(m.blocks[0].tcpa.selection_mode)
                        or matching_loss(m))
    assert run(*args, "--out", tmp_path / "a") == 0
    assert modes == ["random"] * 4 + ["topk"] * 2  # 2 steps an epoch; validation does not change the training's mode
    monkeypatch.undo()

    lr_at, calls = finetune.lr_at, []

    def interrupt_at_step_3(*a):  # the first step of epoch 2
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return lr_at(*a)

    monkeypatch.setattr(finetune, "lr_at", interrupt_at_step_3)
    b = tmp_path / "b"
    assert run(*args, "--out", b) == 130
    assert f"last complete checkpoint is {b / 'last.safetensors'}" in capsys.readouterr().err
    monkeypatch.undo()
    assert meta(b / "last.safetensors")["epoch"] == 1 and len(log(b)["history"]) == 1
    evaluated, logged = evaluate(b / "last.safetensors", "--data", folder, "--weights", weights), log(b)["history"][0]
    assert evaluated["val_acc"] == logged["val_acc"]
    assert evaluated["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)

    assert run(*args, "--out", b, "--resume", b) == 0
    for name in ("last", "best"):
        expected = safetensors.torch.load_file(tmp_path / "a" / f"{name}.safetensors")
        got = safetensors.torch.load_file(b / f"{name}.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    assert [h["val_loss"] for h in log(b)["history"]] == [h["val_loss"] for h in log(tmp_path / "a")["history"]]


def test_interrupt_while_writing_keeps_the_last_checkpoint(tmp_path, folder, weights, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--method", "linear", "--epochs", 2, "--out", out, "--data", folder, "--weights", weights, "--quiet",
            *TINY, *QUICK_ANY]
    save_file = safetensors.torch.save_file

    def interrupted_in_epoch_2(tensors, path, metadata):
        if json.loads(metadata[finetune.CLI_KEY])["epoch"] == 2:
            open(path, "wb").write(b"half a file")
            raise KeyboardInterrupt
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_in_epoch_2)
    assert run(*args) == 130
    monkeypatch.undo()
    assert "last complete checkpoint is" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "last.safetensors", "last_state.pt",
                                                     "log.csv", "log.json"]  # no temp files left
    assert meta(out / "last.safetensors")["epoch"] == 1
    assert torch.load(out / "last_state.pt", weights_only=True)["progress"]["epoch"] == 1
    # resuming with other model / method / recipe options is refused, naming them
    with pytest.raises(SystemExit) as info:
        run(*args, "--resume", out, "--method", "full", "--lr", "0.1")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--method 'linear' (given: 'full')" in err and "--lr 0.004 (given: 0.1)" in err
    assert run(*args, "--resume", out / "last.safetensors") == 0
    assert meta(out / "last.safetensors")["epoch"] == 2 and len(log(out)["history"]) == 2


def test_prompt_transform_options_reach_the_library(tmp_path, folder, weights):
    common = ["--data", folder, "--weights", weights, *QUICK_ANY, "--pool-size", 4, "--epochs", 1, "--quiet", *TINY]
    for method, extra in (("tcpa", ["--prompt-dropout-per-sample", "--fourier-fraction", 0.5, "--topk", 2,
                                    "--random-epochs", 0]), ("vpt", [])):
        out = tmp_path / method
        assert run(*common, "--method", method, "--prompt-transform", "fourier", *extra, "--out", out) == 0
        config = checkpoint.read_trainable(out / "last.safetensors", checkpoint.METADATA_KEY)[0]["config"]
        assert config["prompt_transform"] == "fourier"
        assert config["fourier_fraction"] == (0.5 if method == "tcpa" else 1.0)
        assert config.get("prompt_dropout_per_sample", False) == (method == "tcpa")
        assert evaluate(out / "last.safetensors", "--data", folder, "--weights", weights)["val_acc"] == \
            log(out)["val_acc"]


def test_load_prompts_fills_config_fields_a_file_lacks(tmp_path):
    """A file written before a config field existed loads with the field's default, one with a field that no longer
    exists loads too; save_prompts keeps extra metadata beside the config."""
    def backbone():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=16, **MODEL_KWARGS)

    model = tk.apply_tcpa(backbone(), pool_size_cls=4, pool_size_img=4, topk_cls=2, topk_img=2, num_classes=3)
    path = tmp_path / "prompts.safetensors"
    tk.save_prompts(model, path, {"mine": {"note": 1}})
    assert checkpoint.read_trainable(path, "mine")[0] == {"note": 1}
    with pytest.raises(ValueError, match="extra_metadata"):
        tk.save_prompts(model, path, {checkpoint.METADATA_KEY: {}})
    saved, tensors = checkpoint.read_trainable(path, checkpoint.METADATA_KEY)
    later = ("prompt_dropout_per_sample", "prompt_transform", "fourier_fraction")  # added after 0.1.0
    assert set(later) <= set(saved["config"])
    # ... and a field of earlier files that no longer exists: "attention" chose the fused path or the dense baseline
    old = {**saved, "config": {k: v for k, v in saved["config"].items() if k not in later} | {"attention": "dense"}}
    safetensors.torch.save_file(tensors, path, metadata={checkpoint.METADATA_KEY: json.dumps(old)})
    fresh = tk.load_prompts(backbone(), path)
    defaults = tk.TCPAConfig()
    assert all(getattr(fresh.prompt_state.config, k) == getattr(defaults, k) for k in later)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    tk.load_prompts(fresh, path)  # into the patched model: the filled config equals its own


B = ["--data", "{folder}", "--weights", "{weights}"]
BAD = [
    ([*B, "--match-weight", "nan"], "--match-weight: expected a finite number in [0.0, inf), got nan"),
    ([*B, "--lr", "-1"], "--lr: expected a finite number in (0.0, inf), got -1.0"),
    ([*B, "--lr", "inf"], "--lr: expected a finite number in (0.0, inf), got inf"),
    ([*B, "--prompt-dropout", "1.5"], "--prompt-dropout: expected a finite number in [0.0, 1.0), got 1.5"),
    ([*B, "--val-limit", "0"], "--val-limit: expected an int >= 1, got 0"),
    ([*B, "--train-limit", "-3"], "--train-limit: expected an int >= 1, got -3"),
    ([*B, "--num-prompts", "0"], "--num-prompts: expected an int >= 1, got 0"),
    ([*B, "--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
    ([*B, "--workers", "-1"], "--workers: expected an int >= 0, got -1"),
    ([*B, "--batch-size", "0"], "--batch-size: expected an int >= 1, got 0"),
    ([*B, "--img-size", "0"], "--img-size: expected an int >= 1, got 0"),
    ([*B, "--seed", "-1"], "--seed: expected an int in [0, 4294967295], got -1"),
    ([*B, "--epochs", "x"], "--epochs: invalid int value: 'x'"),
    ([*B, "--model-kwargs", "{bad"], "--model-kwargs: expected a JSON object, got '{bad'"),
    ([*B, "--model-kwargs", "[1]"], "--model-kwargs: expected a JSON object without img_size / num_classes"),
    ([*B, "--model-kwargs", '{"img_size": 32}'], "--model-kwargs: expected a JSON object without img_size"),
    ([*B, "--model", "resnet_nope"], "--model: expected a timm model name, got 'resnet_nope'"),
    ([*B, "--method", "lora"], "--method: invalid choice: 'lora'"),
    (["--data", "{folder}"], "--weights: required (a local backbone checkpoint), or --random-init"),
    ([*B, "--random-init"], "--random-init: not with --weights"),
    ([*B, "--weights", "{tmp}/none.pth"], "--weights: file not found: '{tmp}/none.pth'"),
    ([*B, "--topk", "30"], "--topk: expected an int in [1, 18], got 30"),
    ([*B, "--pool-size", "40"], "--pool-size: expected an int in [1, 32], got 40"),
    ([*B, "--epochs", "5", "--random-epochs", "5"], "--random-epochs: expected fewer than --epochs (5) for tcpa, got"),
    ([*B, "--random-epochs", "100"], "--random-epochs: expected fewer than --epochs (100) for tcpa, got 100"),
    ([*B, "--random-epochs", "-1"], "--random-epochs: expected an int >= 0, got -1"),
    ([*B, "--warmup-epochs", "-1"], "--warmup-epochs: expected a finite number in [0.0, 100], got -1.0"),
    ([*B, "--warmup-epochs", "101"], "--warmup-epochs: expected a finite number in [0.0, 100], got 101.0"),
    ([*B, "--prompt-transform", "fourier", "--fourier-fraction", "0"],
     "--fourier-fraction: expected a finite number in (0.0, 1.0], got 0.0"),
    ([*B, "--fourier-fraction", "0.5"], "--fourier-fraction: applies with --prompt-transform fourier, got 0.5"),
    ([*B, "--prompt-transform", "wavelet"], "--prompt-transform: invalid choice: 'wavelet'"),
    ([*B, "--method", "vpt", "--prompt-dropout-per-sample"], "--prompt-dropout-per-sample: applies to --method tcpa"),
    ([*B, "--method", "linear", "--prompt-transform", "fourier"], "--prompt-transform: applies to --method tcpa or"),
    ([*B, "--hflip", "2"], "--hflip: expected a finite number in [0.0, 1.0], got 2.0"),
    ([*B, "--scale", "0.5", "0.1"], "--scale: expected MIN MAX with MIN <= MAX, got [0.5, 0.1]"),
    ([*B, "--scale", "0", "1"], "--scale: expected a finite number in (0.0, 1.0], got 0.0"),
    ([*B, "--ratio", "-1", "1"], "--ratio: expected a finite number in (0.0, inf), got -1.0"),
    ([*B, "--color-jitter", "-0.1"], "--color-jitter: expected a finite number in [0.0, inf), got -0.1"),
    ([*B, "--reprob", "1.5"], "--reprob: expected a finite number in [0.0, 1.0], got 1.5"),
    ([*B, "--smoothing", "1"], "--smoothing: expected a finite number in [0.0, 1.0), got 1.0"),
    ([*B, "--mixup", "-1"], "--mixup: expected a finite number in [0.0, inf), got -1.0"),
    ([*B, "--cutmix", "nan"], "--cutmix: expected a finite number in [0.0, inf), got nan"),
    ([*B, "--aa", "bogus-policy"], "--aa: expected a timm auto-augment policy"),
    ([*B, "--batch-size", "7"], "--batch-size: mixup/cutmix need an even batch per process, got 7 over 1"),
    ([*B, "--device", "tpu"], "--device: expected auto, cpu or cuda"),
    ([*B, "--data", "{tmp}/missing"], "--data: expected 'fashion-mnist' or a directory with train/ and val/"),
    (["--weights", "{weights}"], "--data: required"),
    ([*B, "--classes", "1", "2"], "--classes: applies to --data fashion-mnist"),
    ([*B, "--eval-only"], "--checkpoint: required with --eval-only"),
    ([*B, "--checkpoint", "{weights}"], "--checkpoint: only with --eval-only"),
    ([*B, "--eval-only", "--checkpoint", "{weights}"], "--checkpoint: {weights} is not a safetensors file"),
    ([*B, "--resume", "{tmp}/nothing"], "--resume: {tmp}/nothing not found"),
    ([*B, "--out", "{tmp}"], "--out: {tmp} exists and is not empty"),
    # models this CLI cannot train, an --out that cannot be written, options --method does not read: exit 2 up front
    ([*B, "--model", "resnet18"], "--model: expected a timm ViT that takes img_size and the --model-kwargs, got "
                                  "'resnet18' (TypeError: ResNet.__init__() got an unexpected keyword argument"),
    ([*B, "--model", "swin_tiny_patch4_window7_224", "--img-size", "224", "--model-kwargs", "{{}}"],
     "--model: expected a timm ViT that --method tcpa supports (VisionTransformer, DeiT, Eva: README, 'Supported "
     "models'), got 'swin_tiny_patch4_window7_224' (SwinTransformer)"),
    ([*B, "--out", "{weights}"], "--out: expected a folder, got '{weights}', which is a file"),
    ([*B, "--out", "{weights}/run"], "--out: expected a folder that can be created, got '{weights}/run', below the "
                                     "file '{weights}'"),
    ([*B, "--out", "/proc/tcpa_run"], "--out: expected a writable folder, got '/proc/tcpa_run': cannot write to "
                                      "'/proc'"),
    ([*B, "--method", "linear", "--topk", "2"], "--topk: applies to --method tcpa, got --method linear (--topk 2)"),
    ([*B, "--method", "vpt", "--random-epochs", "1"], "--random-epochs: applies to --method tcpa, got --method vpt"),
    ([*B, "--method", "vpt", "--match-weight", "0.1"], "--match-weight: applies to --method tcpa, got --method vpt"),
    ([*B, "--method", "full", "--pool-size", "4"], "--pool-size: applies to --method tcpa or vpt, got --method full"),
    ([*B, "--method", "linear", "--prompt-dropout", "0"], "--prompt-dropout: applies to --method tcpa or vpt"),
    ([*B, "--num-prompts", "4"], "--num-prompts: applies to --method vpt, got --method tcpa (--num-prompts 4)"),
    # timm's train.py options
    ([*B, "--input-size", "1", "16", "16"], "--input-size: expected 3 S S (3 channels, a square size S >= 1 as "
                                            "--img-size), got [1, 16, 16]"),
    ([*B, "--input-size", "3", "16", "32"], "--input-size: expected 3 S S (3 channels, a square size S >= 1 as "
                                            "--img-size), got [3, 16, 32]"),
    ([*B, "--input-size", "3", "32", "32"], "--input-size: expected 3 16 16 (--img-size 16), got [3, 32, 32]"),
    ([*B, "--input-size", "3", "16"], "--input-size: expected 3 arguments"),
    ([*B, "--num-classes", "5"], "--num-classes: expected 2 (the classes of --data {folder}), got 5"),
    ([*B, "--num-classes", "0"], "--num-classes: expected an int >= 1, got 0"),
    ([*B, "--opt", "Adam"], "--opt: expected adamw or sgd, got 'adam'"),
    ([*B, "--momentum", "0.5"], "--momentum: applies to --opt sgd, got --opt adamw (--momentum 0.5)"),
    ([*B, "--opt", "sgd", "--momentum", "0"], "--momentum: expected a finite number in (0.0, 1.0), got 0.0"),
    ([*B, "--min-lr", "0.01"], "--min-lr: expected at most --lr (0.004), got 0.01"),
    ([*B, "--min-lr", "-1"], "--min-lr: expected a finite number in [0.0, inf), got -1.0"),
    ([*B, "--warmup-lr", "-0.1"], "--warmup-lr: expected a finite number in [0.0, inf), got -0.1"),
    ([*B, "--clip-grad", "0"], "--clip-grad: expected a finite number in (0.0, inf), got 0.0"),
    ([*B, "--clip-grad", "1", "--clip-mode", "agc"], "--clip-mode: expected norm or value, got 'agc'"),
    ([*B, "--clip-mode", "value"], "--clip-mode: applies with --clip-grad, got value"),
    ([*B, "--std", "0.5", "0", "0.5"], "--std: expected a finite number in (0.0, inf), got 0.0"),
    ([*B, "--mean", "0.5", "nan", "0.5"], "--mean: expected a finite number in [-inf, inf), got nan"),
    ([*B, "--mean", "0.5", "0.5"], "--mean: expected 3 arguments"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[4:] or a) for a, _ in BAD])
def test_bad_arguments_exit_2(tmp_path, folder, weights, capsys, argv, message):
    def fill(s):
        s = s.replace("{{}}", "{}").replace("{folder}", str(folder))
        return s.replace("{weights}", str(weights)).replace("{tmp}", str(tmp_path))

    with pytest.raises(SystemExit) as info:
        finetune.main(TINY + [fill(a) for a in argv])
    assert info.value.code == 2
    assert fill(message) in capsys.readouterr().err


def test_method_options_are_refused_only_when_typed(tmp_path, folder, weights):
    """A --resume'd linear run's record holds TCPA's defaults (--topk 10, ...): they are not refused."""
    args = finetune.parse_args(["--data", str(folder), "--weights", str(weights), *TINY, "--method", "linear",
                                "--out", str(tmp_path / "run")])
    assert (args.topk, args.pool_size, args.random_epochs) == (10, 18, 10)


def test_damaged_weights_and_state_files_exit_2_naming_the_option(tmp_path, folder, weights, capsys, monkeypatch):
    """A truncated --weights (.pth, .safetensors) or last_state.pt ends with exit 2 naming the option, before any
    data is read; weights trained at another --img-size say which tensor differs and how."""
    common = ["--data", folder, "--quiet", *TINY, *QUICK, "--epochs", 1, "--random-epochs", 0]
    out = tmp_path / "run"
    assert run(*common, "--weights", weights, "--epochs", 2, "--out", out) == 0
    monkeypatch.setattr(finetune, "load_data", lambda *a: pytest.fail("the data was read"))
    safetensors.torch.save_file(torch.load(weights, weights_only=True), tmp_path / "w.safetensors")
    for path in (weights, tmp_path / "w.safetensors"):
        cut = tmp_path / f"cut{path.suffix}"
        cut.write_bytes(path.read_bytes()[:-1000])
        with pytest.raises(SystemExit) as info:
            run(*common, "--weights", cut, "--out", tmp_path / "never")
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"--weights: expected a complete .safetensors file or torch state dict, got " \
            f"'{cut}', which cannot be read (" in err, err
    torch.manual_seed(0)  # the tiny backbone at 32 px: 64 patches instead of 16
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **MODEL_KWARGS)
    torch.save(model.state_dict(), tmp_path / "w32.pth")
    with pytest.raises(SystemExit) as info:
        run(*common, "--weights", tmp_path / "w32.pth", "--out", tmp_path / "never")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "lacks" not in err
    assert "holds backbone tensors of another shape than this model (--img-size 16) expects: pos_embed: saved " \
           "(1, 65, 32), expected (1, 17, 32) (the position embedding: --img-size and the patch size must be those " \
           "the weights were trained with)" in err, err
    (out / finetune.STATE).write_bytes((out / finetune.STATE).read_bytes()[:100])
    with pytest.raises(SystemExit) as info:
        run("--resume", out, "--epochs", 3)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--resume: expected a complete last_state.pt written by this CLI, got " \
        f"'{out / finetune.STATE}', which cannot be read (" in err, err


@pytest.mark.skipif(not data.fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("argv, message", [
    (["--aa", "rand-m9"], "--aa: applies to ImageFolder data"),
    (["--scale", "0.5", "1"], "--scale: applies to ImageFolder data"),
    (["--classes", "3", "11"], "--classes: expected distinct Fashion-MNIST classes in 0..9, got [3, 11]"),
    (["--classes", "3", "3"], "--classes: expected distinct Fashion-MNIST classes in 0..9, got [3, 3]"),
    (["--classes", "3", "5", "--num-classes", "10"],
     "--num-classes: expected 2 (the classes of --data fashion-mnist --classes), got 10"),
])
def test_bad_fashion_mnist_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", "fashion-mnist", "--random-init", *TINY, *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bad_eval_only_arguments_exit_2(tmp_path, folder, weights, capsys):
    out = tmp_path / "run"
    assert run("--method", "linear", "--epochs", 1, "--out", out, "--data", folder, "--weights", weights, "--quiet",
               *TINY, *QUICK_ANY) == 0
    for argv, message in (([], "--weights: required: the checkpoint was trained on the backbone"),
                          (["--random-init"], "--random-init: not with --eval-only")):
        with pytest.raises(SystemExit) as info:
            evaluate(out / "last.safetensors", "--data", folder, *argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------ --recipe and --input-prompter


def test_recipe_sets_the_released_scripts_values_and_given_options_win(folder, capsys):
    base = ["--data", str(folder), "--random-init"]
    args = finetune.parse_args([*base, "--recipe", "cub"])
    assert (args.lr, args.weight_decay, args.input_prompter) == (0.0015, 0.5, True)
    assert capsys.readouterr().out == ("tcpa-finetune: from --recipe cub (sh/VFPT_TCPA_cub.sh of the TCPA code "
                                       "release, arXiv 2505.02406): --lr 0.0015, --weight-decay 0.5, "
                                       "--input-prompter\n")
    args = finetune.parse_args([*base, "--recipe", "cub", "--lr", "0.01", "--no-input-prompter"])
    assert (args.lr, args.weight_decay, args.input_prompter) == (0.01, 0.5, False)
    assert capsys.readouterr().out.endswith(": --weight-decay 0.5; as given: --lr 0.01, --no-input-prompter\n")
    for name, recipe in finetune.RECIPES.items():
        args = finetune.parse_args([*base, "--recipe", name, "--method", "vpt"])
        assert {key: getattr(args, key) for key in recipe} == recipe
    assert [name for name, recipe in finetune.RECIPES.items() if recipe["input_prompter"]] == ["cub"]
    assert finetune.RECIPES["flower"] == {"lr": 0.014, "weight_decay": 1.4, "input_prompter": False}
    args = finetune.parse_args([*base, "--input-prompter"])  # without a recipe: the defaults, and the flag as given
    assert (args.lr, args.weight_decay, args.input_prompter, args.recipe) == (0.004, 0.1, True, None)
    assert "sh/VFPT_TCPA_<dataset>.sh" in finetune.build_parser().format_help()


def test_recipe_cub_trains_the_input_prompter_and_its_checkpoints_carry_it(tmp_path, folder, weights, capsys):
    out = tmp_path / "run"
    args = ["--data", folder, "--weights", weights, "--quiet", *TINY, *QUICK, "--epochs", 1, "--random-epochs", 0,
            "--recipe", "cub", "--lr", 0.01]
    assert run(*args, "--out", out) == 0
    saved = meta(out / "last.safetensors")["args"]
    assert (saved["recipe"], saved["lr"], saved["weight_decay"], saved["input_prompter"]) == ("cub", 0.01, 0.5, True)
    record, tensors = checkpoint.read_trainable(out / "last.safetensors", checkpoint.METADATA_KEY)
    assert record["config"]["input_prompter"] and "patch_embed.input_prompter.conv1.weight" in tensors
    fresh = tk.load_prompts(timm.create_model("vit_tiny_patch16_224", img_size=16, **MODEL_KWARGS),
                            out / "last.safetensors")  # a plain timm model gets the prompter with the prompts
    assert type(fresh.patch_embed).__name__ == "InputPromptedPatchEmbed"
    name = "patch_embed.input_prompter.conv1.weight"
    assert torch.equal(fresh.get_parameter(name), tensors[name])
    assert log(out)["trainable_parameters"] == tk.count_parameters(fresh)[0]  # the optimizer had the prompter
    assert evaluate(out / "last.safetensors", "--data", folder, "--weights", weights)["val_acc"] == log(out)["val_acc"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # resuming with the prompter off is refused, naming the option
        finetune.parse_args([str(a) for a in args] + ["--no-input-prompter", "--resume", str(out)])
    assert info.value.code == 2 and "--input-prompter True (given: False)" in capsys.readouterr().err
    assert finetune.parse_args([str(a) for a in args] + ["--resume", str(out)]).out == str(out)


def test_runs_recorded_before_recipe_and_input_prompter_resume(tmp_path, folder):
    """A checkpoint whose record predates --recipe / --input-prompter resumes as a run without them."""
    old = tmp_path / "old"
    argv = ["--data", str(folder), "--random-init"]
    record = json.loads(json.dumps(vars(finetune.parse_args([*argv, "--out", str(old)]))))
    del record["recipe"], record["input_prompter"]
    old.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(1)}, old / finetune.LAST,
                                metadata={finetune.CLI_KEY: json.dumps({"epoch": 1, "args": record})})
    (old / finetune.STATE).write_bytes(b"")
    args = finetune.parse_args([*argv, "--resume", str(old)])
    assert args.out == str(old) and (args.recipe, args.input_prompter) == (None, False)


@pytest.mark.parametrize("argv, message", [
    (["--method", "linear", "--recipe", "cub"], "--recipe: applies to --method tcpa or vpt, got --method linear"),
    (["--method", "full", "--input-prompter"], "--input-prompter: applies to --method tcpa or vpt, got --method full"),
    (["--recipe", "imagenet"], "--recipe: invalid choice: 'imagenet'"),
    (["--recipe", "cub", "--lr", "0"], "--lr: expected a finite number in (0.0, inf), got 0.0"),
])
def test_bad_recipe_arguments_exit_2(folder, weights, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", str(folder), "--weights", str(weights), *TINY, *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ defaults a newcomer's first command can use


@pytest.mark.skipif(not data.fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_first_fashion_mnist_command_runs_with_derived_defaults(tmp_path, capsys):
    """`--data fashion-mnist --random-init --epochs 1` runs as typed: warm-up and random-selection epochs are 10 % of
    --epochs, the image size Fashion-MNIST's 28 px rounded up to the patch size, the batch at most the training
    images; the banner says which values were derived."""
    args = finetune.parse_args(["--data", "fashion-mnist", "--random-init", "--epochs", "1"])
    assert (args.warmup_epochs, args.random_epochs, args.img_size, args.batch_size) == (0.1, 0, 32, None)
    assert finetune.parse_args(["--data", "fashion-mnist", "--random-init"]).random_epochs == 10
    kwargs = json.dumps({k: v for k, v in MODEL_KWARGS.items()})  # patch 4: 28 px is 7 x 7 patches
    out = tmp_path / "run"
    assert run("--data", "fashion-mnist", "--random-init", "--epochs", 1, "--train-limit", 38, "--val-limit", 16,
               "--pool-size", 4, "--topk", 2, "--model-kwargs", kwargs, "--out", out) == 0
    saved = meta(out / "last.safetensors")["args"]
    assert (saved["img_size"], saved["batch_size"], saved["warmup_epochs"]) == (28, 38, 0.1)
    printed = capsys.readouterr().out
    assert "38 training / 16 validation images, 10 classes" in printed and "trainable parameters" in printed
    assert "--img-size 28 (Fashion-MNIST's 28 px rounded up to the patch size 4)" in printed
    assert "--batch-size 38 (128, at most the training images)" in printed
    assert "--warmup-epochs 0.1 (10 % of --epochs)" in printed


def test_default_batch_size_fits_the_training_set():
    assert finetune.default_batch_size(60000, 1, True) == 128
    assert finetune.default_batch_size(37, 1, True) == 36  # mixup pairs images: even
    assert finetune.default_batch_size(37, 4, False) == 36  # a multiple of the processes
    with pytest.raises(SystemExit) as info:
        finetune.default_batch_size(1, 1, True)
    assert info.value.code == 2


def test_every_bad_option_in_one_message_defaults_named(folder, capsys):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", str(folder), "--random-init", *TINY, "--pool-size", "4", "--lr", "-1",
                       "--batch-size", "7", "--epochs", "2", "--random-epochs", "2"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert all(line.startswith("tcpa-finetune: error: --") for line in lines) and len(lines) == 4, lines
    assert "--topk: expected an int in [1, 4], got 10" in lines[0] and lines[0].endswith("(not given: a default)")
    assert [line.split()[2] for line in lines[1:]] == ["--lr:", "--random-epochs:", "--batch-size:"]
    assert not any("not given" in line for line in lines[1:])


# ------------------------------------------------------------------------- --resume alone, --checkpoint DIR


def test_resume_alone_continues_with_the_runs_options_and_extends_it(tmp_path, folder, capsys):
    out = tmp_path / "run"
    first = ["--data", folder, "--random-init", *TINY, *QUICK_ANY, "--method", "linear", "--epochs", 1,
             "--val-limit", 2, "--quiet", "--out", out]
    assert run(*first) == 0
    assert run("--resume", out, "--epochs", 2) == 0  # every other option from the checkpoint
    assert meta(out / "last.safetensors")["epoch"] == 2 and len(log(out)["history"]) == 2
    assert meta(out / "last.safetensors")["args"]["val_limit"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run("--resume", out, "--epochs", 1)
    assert info.value.code == 2
    assert "--epochs: expected at least the 2 epochs the run has done, got 1" in capsys.readouterr().err
    # --eval-only: --checkpoint takes the folder (its best.safetensors) and evaluates the whole split, not the run's
    # --val-limit, saying how many images
    evaluated = evaluate(out, "--data", folder)
    assert evaluated["checkpoint"] == str(out / "best.safetensors") and evaluated["images"] == 8
    assert evaluate(out, "--data", folder, "--val-limit", 3)["images"] == 3


# ------------------------------------------------------------------------------------------- console output


def test_console_shows_an_estimate_one_line_an_epoch_and_a_summary(tmp_path, folder, weights, capsys):
    out = tmp_path / "run"
    assert run("--data", folder, "--weights", weights, *TINY, *QUICK, "--epochs", 3, "--out", out) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^tcpa-finetune: about \d+ s per epoch, \d+ s in all \(3 epochs, training only; from the first "
                     r"2 steps\)$", printed, re.M), printed
    lines = re.findall(r"^epoch .*$", printed, re.M)
    history = log(out)["history"]
    assert len(lines) == 3 and not any(line.startswith("{") for line in printed.splitlines())
    for line, h in zip(lines, history):
        assert re.fullmatch(rf"epoch {h['epoch']}/3  train loss {h['train_loss']:.3f}  val loss {h['val_loss']:.3f}  "
                            rf"val acc {100 * h['val_acc']:.1f} %  lr \d\.\de-\d\d  \d+ s", line), line
    summary = log(out)
    assert (f"tcpa-finetune: done: best val acc {100 * summary['best_val_acc']:.1f} % at epoch "
            f"{summary['best_epoch']} of 3 (last {100 * summary['val_acc']:.1f} %), ") in printed
    assert printed.rstrip().endswith(f"files in {out}: best.safetensors, last.safetensors, last_state.pt, log.csv, "
                                     "log.json, curves.png")


def test_curves_have_integer_epoch_ticks():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "train_acc": e / 4, "val_acc": e / 4}
               for e in (1, 2, 3)]
    fig = finetune.curves_figure({"method": "tcpa", "history": history}, plt)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def test_durations_read_as_seconds_minutes_hours():
    assert [finetune.duration(s) for s in (42, 210, 7560)] == ["42 s", "3.5 min", "2.1 h"]
    assert finetune.eta_line(3.0, 3, 10, 5).startswith("tcpa-finetune: about 10 s per epoch, 50 s in all (5 epochs")


def test_timm_short_options_are_aliases(folder):
    args = finetune.parse_args(["--data", str(folder), "--random-init", "-b", "16", "-j", "2"])
    assert (args.batch_size, args.workers) == (16, 2)
    assert {"batch_size", "workers"} <= finetune.given_options(["-b", "16", "-j", "2"])
    text = finetune.build_parser().format_help()
    assert "-b BATCH_SIZE, --batch-size BATCH_SIZE" in text and "-j WORKERS, --workers WORKERS" in text


# ----------------------------------------------------------------------------------- timm's train.py options

# a linear probe on a random backbone, 2 steps an epoch: the fastest run
LINEAR = ["--random-init", *QUICK_ANY, "--method", "linear", "--quiet"]


@pytest.fixture
def steps():
    """What each optimizer step sees (the gradients after clipping, before the update): the optimizer's type,
    learning rate, momentum and nesterov (SGD), the gradients' total norm and largest absolute value."""
    seen = []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        grads = torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        seen.append({"type": type(optimizer).__name__, "lr": group["lr"], "momentum": group.get("momentum"),
                     "nesterov": group.get("nesterov"), "norm": float(grads.norm()), "max": float(grads.abs().max())})

    handle = register_optimizer_step_pre_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("argv, momentum", [(["--opt", "sgd"], 0.9), (["--opt", "SGD", "--momentum", "0.5"], 0.5)])
def test_opt_sgd_is_timms_nesterov_sgd(tmp_path, folder, steps, argv, momentum):
    assert run("--data", folder, *LINEAR, *TINY, "--epochs", 1, "--out", tmp_path / "run", *argv) == 0
    assert [(s["type"], s["momentum"], s["nesterov"]) for s in steps] == [("SGD", momentum, True)] * 2
    assert meta(tmp_path / "run" / "last.safetensors")["args"]["opt"] == "sgd"
    default = finetune.parse_args(["--data", str(folder), "--random-init"])
    assert default.opt == "adamw" and type(finetune.create_optimizer([torch.zeros(1)], default)) is torch.optim.AdamW


def test_warmup_lr_and_min_lr_bound_the_schedule(tmp_path, folder, steps):
    """2 warm-up and 2 cosine steps: the warm-up rises from --warmup-lr (its first step a half of the way), the
    cosine decays to --min-lr (reached after the last step); their defaults (0) keep the schedule as it was."""
    assert run("--data", folder, *LINEAR, *TINY, "--epochs", 2, "--out", tmp_path / "run", "--lr", 0.01,
               "--warmup-lr", 0.002, "--min-lr", 0.004) == 0
    assert [s["lr"] for s in steps] == pytest.approx([0.006, 0.01, 0.01, 0.007])
    assert finetune.lr_at(4, 4, 2, 0.01, 0.002, 0.004) == pytest.approx(0.004)
    assert [finetune.lr_at(s, 4, 2, 0.01) for s in range(5)] == pytest.approx([0.005, 0.01, 0.01, 0.005, 0])


@pytest.mark.parametrize("argv, clipped", [
    ([], "norm"),
    (["--clip-mode", "value"], "max"),
    (["--clip-mode", "norm", "--amp", "fp16"], "norm"),  # the fp16 grad scaler's gradients are unscaled first
], ids=["norm", "value", "norm-fp16"])
def test_clip_grad_clips_the_gradients_before_each_step(tmp_path, folder, steps, argv, clipped):
    """Unclipped, the gradients' norm is about 1 (their largest value 0.3): clipped to 1e-3, every step sees it."""
    assert run("--data", folder, *LINEAR, *TINY, "--epochs", 2, "--out", tmp_path / "run", "--clip-grad", 1e-3,
               *argv) == 0
    assert len(steps) >= 3 and all(s[clipped] == pytest.approx(1e-3, rel=1e-4) for s in steps), steps


def test_mean_std_reach_the_transforms_and_the_checkpoint(tmp_path, folder, monkeypatch):
    made, datasets = [], data.datasets
    monkeypatch.setattr(data, "datasets", lambda *a: made.append(datasets(*a)) or made[-1])
    out = tmp_path / "run"
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    assert run("--data", folder, *LINEAR, *TINY, "--epochs", 1, "--out", out, "--mean", *mean, "--std", *std) == 0
    for ds in made[0]:  # train and val
        normalize = [t for t in ds.transform.transforms if isinstance(t, Normalize)]
        assert len(normalize) == 1
        torch.testing.assert_close(torch.as_tensor(normalize[0].mean), torch.tensor(mean))
        torch.testing.assert_close(torch.as_tensor(normalize[0].std), torch.tensor(std))
    config = meta(out / "last.safetensors")["data_config"]
    assert (config["mean"], config["std"]) == (mean, std)  # --eval-only normalises the same way
    assert evaluate(out / "last.safetensors", "--data", folder)["val_acc"] == log(out)["val_acc"]


def test_input_size_is_img_size(tmp_path, folder):
    base = ["--data", str(folder), "--random-init", *QUICK_ANY, "--method", "linear", "--quiet", "--epochs", "1"]
    by_input_size = finetune.parse_args([*base, *TINY_MODEL, "--input-size", "3", "16", "16", "--num-classes", "2",
                                         "--out", str(tmp_path / "a")])
    by_img_size = finetune.parse_args([*base, *TINY, "--out", str(tmp_path / "b")])
    assert by_input_size.img_size == 16 and "img_size" not in by_input_size._defaults
    differ = {k for k in vars(by_img_size) if getattr(by_img_size, k) != getattr(by_input_size, k)}
    assert differ == {"input_size", "num_classes", "out"}
    for args in (by_input_size, by_img_size):
        finetune.train(args)
    a, b = (safetensors.torch.load_file(tmp_path / name / "last.safetensors") for name in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_gives_defaults_the_command_line_wins(tmp_path, folder, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"method: linear\nbatch_size: 4\nlr: 0.01\nopt: SGD\nmomentum: 0.8\nwarmup_epochs: 1\n"
                      f"scale: [0.5, 1.0]\nmodel_kwargs: {json.dumps(MODEL_KWARGS)}\nquiet: true\ncompile: false\n"
                      "input_prompter: null\n")
    args = finetune.parse_args(["-c", str(config), "--data", str(folder), "--random-init", "--lr", "0.02",
                                "--scale", "0.25", "1"])
    assert (args.method, args.batch_size, args.lr, args.opt, args.momentum, args.scale, args.model_kwargs) == \
        ("linear", 4, 0.02, "sgd", 0.8, [0.25, 1.0], MODEL_KWARGS)
    assert (args.quiet, args.compile, args.input_prompter, args.config) == (True, False, False, str(config))
    assert "warmup_epochs" not in args._defaults and "random_epochs" in args._defaults  # the file's are given
    config.write_text("recipe: cub\ninput_prompter: false\n")
    args = finetune.parse_args(["--config", str(config), "--data", str(folder), "--random-init"])
    assert (args.lr, args.input_prompter) == (0.0015, False)
    assert capsys.readouterr().out.endswith("as given: --no-input-prompter\n")


@pytest.mark.parametrize("text, message", [
    (None, "--config: expected a readable YAML file, got '{path}' (FileNotFoundError: "),
    ("lr: [1", "--config: expected a readable YAML file, got '{path}' (ParserError: "),
    ("- 1\n", "--config: expected a YAML mapping of option names to values, got '{path}' holding list"),
    ("batch-size: 4\nfoo: 1\n", "--config: expected option names with underscores (e.g. batch_size) as the keys of "
                                 "'{path}', got unknown keys batch-size, foo"),
    ("quiet: 1\n", "--config: expected true or false for quiet in '{path}', got 1"),
    ("opt: adam\n", "--opt: expected adamw or sgd, got 'adam'"),
    ("method: linear\ntopk: 2\n", "--topk: applies to --method tcpa, got --method linear (--topk 2)"),
    ("opt: adamw\nmomentum: 0.5\n", "--momentum: applies to --opt sgd, got --opt adamw (--momentum 0.5)"),
    ("lr: -1\n", "--lr: expected a finite number in (0.0, inf), got -1.0 (float)\n"),  # given: no "(not given"
], ids=["missing", "bad-yaml", "list", "unknown-keys", "flag", "opt", "topk", "momentum", "lr"])
def test_bad_config_files_exit_2(tmp_path, folder, capsys, text, message):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", str(folder), "--random-init", *TINY, "-c", str(path)])
    assert info.value.code == 2 and message.format(path=path) in capsys.readouterr().err


def test_every_bad_timm_option_in_one_message(folder, capsys):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--data", str(folder), "--random-init", *TINY, "--opt", "adam", "--min-lr", "1",
                       "--clip-grad", "-1", "--momentum", "0.5", "--num-classes", "3"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert sorted(line.split()[2] for line in lines) == ["--clip-grad:", "--min-lr:", "--momentum:", "--num-classes:",
                                                         "--opt:"], lines


def test_resume_alone_keeps_the_timm_options(tmp_path, folder, steps):
    """A run set up by a config file and the command line continues with every new option from its record (the
    file is gone)."""
    config = tmp_path / "config.yaml"
    config.write_text("opt: sgd\nmomentum: 0.5\nclip_grad: 0.001\nclip_mode: value\n")
    out = tmp_path / "run"
    assert run("--data", folder, *LINEAR, *TINY_MODEL, "--input-size", 3, 16, 16, "--num-classes", 2, "--epochs", 1,
               "--lr", 0.01, "--warmup-lr", 0.002, "--min-lr", 0.004, "--mean", 0.1, 0.2, 0.3, "--std", 0.4, 0.5, 0.6,
               "-c", config, "--out", out) == 0
    first = meta(out / "last.safetensors")["args"]
    config.unlink()
    steps.clear()
    assert run("--resume", out, "--epochs", 2) == 0
    saved = meta(out / "last.safetensors")
    assert {k: saved["args"][k] for k in finetune.LATER_OPTIONS} == {k: first[k] for k in finetune.LATER_OPTIONS}
    assert saved["args"]["img_size"] == 16 and saved["data_config"]["std"] == [0.4, 0.5, 0.6]
    assert [(s["type"], s["momentum"], s["nesterov"]) for s in steps] == [("SGD", 0.5, True)] * 2
    assert [s["lr"] for s in steps] == pytest.approx([0.01, 0.007])  # the cosine of 2 epochs, to --min-lr
    assert all(s["max"] == pytest.approx(1e-3, rel=1e-4) for s in steps)


def test_runs_recorded_before_the_timm_options_resume_with_their_defaults(tmp_path, folder):
    old = tmp_path / "old"
    argv = ["--data", str(folder), "--random-init"]
    record = json.loads(json.dumps(vars(finetune.parse_args([*argv, "--out", str(old)]))))
    new = ("input_size", "num_classes", "mean", "std", "opt", "momentum", "warmup_lr", "min_lr", "clip_grad",
           "clip_mode", "config")
    for name in new:
        del record[name]
    old.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(1)}, old / finetune.LAST,
                                metadata={finetune.CLI_KEY: json.dumps({"epoch": 1, "args": record})})
    (old / finetune.STATE).write_bytes(b"")
    args = finetune.parse_args([*argv, "--resume", str(old)])
    assert {name: getattr(args, name) for name in new} == {
        "input_size": None, "num_classes": None, "mean": None, "std": None, "opt": "adamw", "momentum": 0.9,
        "warmup_lr": 0.0, "min_lr": 0.0, "clip_grad": None, "clip_mode": "norm", "config": None}


def test_timm_options_are_in_help_with_their_defaults():
    parser = finetune.build_parser()
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    expected = {"input_size": "data", "num_classes": "data", "mean": "data", "std": "data",
                "opt": "training recipe", "momentum": "training recipe", "warmup_lr": "training recipe",
                "min_lr": "training recipe", "clip_grad": "training recipe", "clip_mode": "training recipe",
                "config": "run"}
    assert {name: groups[name] for name in expected} == expected
    text = re.sub(r"\s+", " ", parser.format_help())
    for shown in ("--input-size C H W", "--num-classes N", "--mean M M M", "--std S S S", "--opt {adamw,sgd}",
                  "--momentum M", "--warmup-lr LR", "--min-lr LR", "--clip-grad X", "--clip-mode {norm,value}",
                  "-c FILE, --config FILE", "(default: adamw)", "(default: 0.9)", "(default: norm)"):
        assert shown in text, shown
    helps = {a.dest: a.help for a in parser._actions}
    assert all("default" in helps[name] or name == "config" for name in expected)
