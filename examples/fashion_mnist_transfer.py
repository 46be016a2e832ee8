"""Offline transfer demo on Fashion-MNIST (Debian's dataset-fashion-mnist): linear probe vs VPT-deep vs TCPA.

1. Pretrain a small ViT from scratch on classes 0-4 (cached in runs/fmnist/pretrain).
2. Freeze it and transfer to classes 5-9 with each method, several seeds, the same prompt-token budget
   (TCPA: 2 pools x 18 entries x 1 token; VPT-deep: 36 prompts per layer).
3. Write runs/fmnist/results.{json,md,png}: val accuracy mean ± std, time per epoch, peak memory.

    apt-get install dataset-fashion-mnist
    python examples/fashion_mnist_transfer.py               # ~15 min on a 2-core CPU
    python examples/fashion_mnist_transfer.py --seeds 0 --transfer-epochs 2   # quicker look

Every run is a subprocess of ``python -m tcpa_kernels.finetune`` so its peak memory is its own.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "28",
         "--model-kwargs", json.dumps({"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3})]
PRETRAIN_CLASSES, TRANSFER_CLASSES = ["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]


def finetune(*args):
    command = [sys.executable, "-m", "tcpa_kernels.finetune", "--data", "fashion-mnist", "--quiet", *MODEL, *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/fmnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["linear", "vpt", "tcpa"])
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--transfer-epochs", type=int, default=5)
    parser.add_argument("--transfer-train-limit", type=int, default=5000, help="training images for the transfer")
    args = parser.parse_args()
    out = Path(args.out)

    pretrained = out / "pretrain" / "checkpoint.safetensors"
    if not pretrained.exists():
        finetune("--method", "full", "--classes", *PRETRAIN_CLASSES, "--epochs", str(args.pretrain_epochs),
                 "--batch-size", "128", "--lr", "1e-3", "--out", str(pretrained.parent))

    runs = {}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = out / f"{method}_seed{seed}"
            finetune("--method", method, "--classes", *TRANSFER_CLASSES, "--weights", str(pretrained),
                     "--epochs", str(args.transfer_epochs), "--train-limit", str(args.transfer_train_limit),
                     "--batch-size", "64", "--seed", str(seed), "--out", str(run_dir))
            runs.setdefault(method, []).append(json.loads((run_dir / "log.json").read_text()))

    table = {}
    for method, logs in runs.items():
        accs = [log["val_acc"] for log in logs]
        table[method] = {"val_acc_mean": statistics.mean(accs),
                         "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "val_accs": accs,
                         "epoch_s_mean": statistics.mean(log["epoch_s_mean"] for log in logs),
                         "peak_memory_mb": max(log["peak_memory_mb"] for log in logs),
                         "memory_metric": logs[0]["memory_metric"],
                         "trainable_parameters": logs[0]["trainable_parameters"]}
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": table}, indent=2))
    lines = ["| method | val acc (classes 5-9) | time / epoch (s) | peak memory (MB) | trainable params |",
             "|---|---|---|---|---|"]
    for method, r in table.items():
        lines.append(f"| {method} | {100 * r['val_acc_mean']:.2f} ± {100 * r['val_acc_std']:.2f} % "
                     f"(n={len(r['val_accs'])}) | {r['epoch_s_mean']:.1f} | {r['peak_memory_mb']:.0f} "
                     f"({r['memory_metric']}) | {r['trainable_parameters']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, out / "results.png")


def plot(table, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    methods = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    panels = (("val_acc_mean", "val accuracy", "val_acc_std"), ("epoch_s_mean", "time / epoch (s)", None),
              ("peak_memory_mb", "peak memory (MB)", None))
    for ax, (key, title, err) in zip(axes, panels):
        ax.bar(methods, [table[m][key] for m in methods], yerr=[table[m][err] for m in methods] if err else None,
               color=["C0", "C1", "C3"][:len(methods)], capsize=4)
        ax.set_title(title)
    fig.suptitle("Fashion-MNIST transfer (pretrained on classes 0-4, frozen backbone)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
