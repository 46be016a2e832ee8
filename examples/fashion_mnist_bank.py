"""Several TCPA tasks trained separately, then served mixed from one backbone with ``PromptBank`` (Fashion-MNIST,
offline, CPU).

1. The frozen backbone: a small ViT pretrained on classes 0-4 (``examples/fashion_mnist_transfer.py``'s, reused from
   OUT/pretrain, else trained here the same way).
2. Each task is its own class subset of the other classes, trained alone with the fine-tuning CLI (TCPA, its
   defaults on a short schedule: warm-up and random selection for 10 % of the epochs; each task its own pool size
   and top-k); its checkpoint holds its prompts, keys and head.
3. Serving: one ``PromptBank`` of every task's checkpoint on one copy of the backbone; every task's validation
   images, shuffled together, go through it in mixed batches. Each task's accuracy is compared with its model alone
   (the backbone with that task's checkpoint loaded) on the same images, and the wall time of the mixed batches with
   that of running each task's images through its own model.
4. OUT/fashion-mnist-bank.{json,md} (docs/fashion-mnist-bank.md is a run of the defaults).

    apt-get install dataset-fashion-mnist
    python examples/fashion_mnist_bank.py                    # about 15 minutes on a 2-core CPU
    python examples/fashion_mnist_bank.py --epochs 1 --train-limit 300   # a quick look
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tcpa_kernels as tk  # noqa: E402
from tcpa_kernels.data import GreyTransform, fashion_mnist, model_data_config  # noqa: E402
from tcpa_kernels.finetune import load_backbone  # noqa: E402

MODEL_NAME, IMG_SIZE = "vit_tiny_patch16_224", 28
MODEL_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}  # the transfer example's backbone
PRETRAIN_CLASSES = [0, 1, 2, 3, 4]
TASKS = {"sandal-shirt": [5, 6], "sneaker-bag": [7, 8], "boot-sandal-bag": [9, 5, 8]}  # Fashion-MNIST class ids
POOLS = {"sandal-shirt": ["--pool-size", "8", "--topk", "4"], "sneaker-bag": [],  # each task's own pools (CLI
         "boot-sandal-bag": ["--pool-size", "24", "--topk", "12"]}  # defaults: 18 entries, top-10), one bank


def finetune(args: list[str]) -> None:
    command = [sys.executable, "-m", "tcpa_kernels.finetune", "--data", "fashion-mnist", "--quiet", "--model",
               MODEL_NAME, "--img-size", str(IMG_SIZE), "--model-kwargs", json.dumps(MODEL_KWARGS), *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def backbone(weights: Path) -> torch.nn.Module:
    """The frozen pretrained backbone, as the fine-tuning CLI builds it."""
    import timm

    model = timm.create_model(MODEL_NAME, pretrained=False, img_size=IMG_SIZE, **MODEL_KWARGS)
    load_backbone(model, weights)
    return model.eval()


def mixed_validation(weights: Path, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every task's validation images (``limit`` each), shuffled together: images [M, 3, S, S], labels [M] (each in
    its task's classes), task names [M]."""
    transform = GreyTransform(model_data_config(backbone(weights), IMG_SIZE))
    images, labels, tasks = [], [], []
    for name, classes in TASKS.items():
        val = fashion_mnist("val", transform, classes)
        take = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        batch = val.__getitems__(take)
        images += [x for x, _ in batch]
        labels += [int(y) for _, y in batch]
        tasks += [name] * len(batch)
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return torch.stack(images)[order], torch.tensor(labels)[order], [tasks[i] for i in order]


@torch.no_grad()
def serve(bank: tk.PromptBank, images, tasks, batch: int) -> tuple[torch.Tensor, float]:
    """Predictions [M] of the bank over mixed batches, and the seconds it took."""
    start, predictions = time.perf_counter(), []
    for i in range(0, len(tasks), batch):
        predictions.append(bank(images[i:i + batch], tasks[i:i + batch]).logits.argmax(1))
    return torch.cat(predictions), time.perf_counter() - start


@torch.no_grad()
def alone(weights: Path, checkpoints: dict, images, tasks, batch: int) -> tuple[torch.Tensor, float]:
    """Predictions [M] of each task's own model (the backbone with its checkpoint) on its images, batch by batch,
    and the seconds they took (model building excluded)."""
    predictions, seconds = torch.empty(len(tasks), dtype=torch.long), 0.0
    for name, checkpoint in checkpoints.items():
        model = tk.load_prompts(backbone(weights), checkpoint).eval()
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == name])
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            predictions[rows[i:i + batch]] = model(images[rows[i:i + batch]]).argmax(1)
        seconds += time.perf_counter() - start
    return predictions, seconds


def accuracies(predictions, labels, tasks) -> dict[str, float]:
    return {name: float((predictions == labels)[[t == name for t in tasks]].float().mean()) for name in TASKS}


def markdown(result: dict) -> str:
    lines = ["| task | classes | pools (CLS + image), top-k | val images | accuracy, bank (mixed batches) | "
             "accuracy, its model alone |", "|---|---|---|---|---|---|"]
    for name, classes in TASKS.items():
        pool_cls, pool_img, topk, _ = result["pools"][name]
        lines.append(f"| {name} | {classes} | {pool_cls} + {pool_img}, top-{topk} | {result['val_images'][name]} | "
                     f"{100 * result['accuracy_bank'][name]:.2f} % | {100 * result['accuracy_alone'][name]:.2f} % |")
    t = result["seconds"]
    lines += ["", f"Predictions that differ between the bank and the models alone: {result['differing_predictions']} "
              f"of {sum(result['val_images'].values())}.", "",
              f"Serving every task's validation images, batches of {result['settings']['batch']}, CPU "
              f"({result['threads']} threads, torch backend): the bank, mixed batches, {t['bank']:.2f} s; each "
              f"task's model on its own images, {t['alone']:.2f} s."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/fmnist")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per task")
    parser.add_argument("--train-limit", type=int, default=1500, help="training images per task")
    parser.add_argument("--val-limit", type=int, default=500, help="validation images per task")
    parser.add_argument("--batch", type=int, default=128, help="serving batch size")
    parser.add_argument("--seed", type=int, default=0)
    settings = parser.parse_args()
    out = Path(settings.out)
    weights = out / "pretrain" / "last.safetensors"
    if not (out / "pretrain" / "log.json").exists():
        finetune(["--method", "full", "--random-init", "--classes", *map(str, PRETRAIN_CLASSES), "--epochs",
                  str(settings.pretrain_epochs), "--warmup-epochs", "1", "--lr", "1e-3", "--weight-decay", "1e-4",
                  "--mixup", "0", "--out", str(out / "pretrain")])
    checkpoints = {}
    for name, classes in TASKS.items():
        run = out / "_".join([f"bank_{name}", *(option.lstrip("-") for option in POOLS[name])])
        if not (run / "log.json").exists():
            finetune(["--method", "tcpa", "--classes", *map(str, classes), "--weights", str(weights), "--epochs",
                      str(settings.epochs), "--train-limit", str(settings.train_limit), "--seed", str(settings.seed),
                      *POOLS[name], "--out", str(run)])
        checkpoints[name] = run / "last.safetensors"

    images, labels, tasks = mixed_validation(weights, settings.val_limit, settings.seed)
    bank = tk.PromptBank(backbone(weights), checkpoints).eval()
    bank_predictions, bank_seconds = serve(bank, images, tasks, settings.batch)
    alone_predictions, alone_seconds = alone(weights, checkpoints, images, tasks, settings.batch)
    result = {"settings": vars(settings), "threads": torch.get_num_threads(), "tasks": TASKS,
              "pools": {name: bank.layouts[t][:4] for t, name in enumerate(bank.task_names)},  # Pc, Pi, k_cls, k_img
              "val_images": {name: tasks.count(name) for name in TASKS},
              "accuracy_bank": accuracies(bank_predictions, labels, tasks),
              "accuracy_alone": accuracies(alone_predictions, labels, tasks),
              "differing_predictions": int((bank_predictions != alone_predictions).sum()),
              "seconds": {"bank": bank_seconds, "alone": alone_seconds}}
    (out / "fashion-mnist-bank.json").write_text(json.dumps(result, indent=2))
    (out / "fashion-mnist-bank.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
