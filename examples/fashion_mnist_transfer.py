"""Offline transfer study on Fashion-MNIST (Debian's dataset-fashion-mnist): linear probe, VPT-deep, VFPT, TCPA,
VFPT+TCPA (the published configuration) and VFPT+TCPA with per-sample prompt dropout, several seeds, paired.

1. Pretrain a small ViT from scratch on classes 0-4 (cached in OUT/pretrain).
2. Freeze it and transfer to classes 5-9 with each method and seed, with the fine-tuning CLI's defaults (the
   published TCPA recipe: AdamW lr 0.004, weight decay 0.1, batch 128, mixup 0.8, matching weight 0.01, pools
   18 + 18, top-10, prompt dropout 0.1) scaled to a short schedule: random selection and warm-up for the first
   tenth of the epochs, as published (10 of 100). VPT/VFPT get TCPA's prompt-token budget (36 per layer).
3. Write OUT/results.{json,md,png}: final-epoch val accuracy mean ± std per method, and paired differences per seed
   (a seed fixes the training subset, data order and initialisation for every method).

    apt-get install dataset-fashion-mnist
    python examples/fashion_mnist_transfer.py                       # about 1.5 hours on a 2-core CPU
    python examples/fashion_mnist_transfer.py --seeds 0 --epochs 2  # a quick look

Every run is a subprocess of ``python -m tcpa_kernels.finetune`` (its peak memory is its own); a finished run
(its log.json exists) is reused, an interrupted one resumed from its last checkpoint.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "28",
         "--model-kwargs", json.dumps({"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3})]
PRETRAIN_CLASSES, TRANSFER_CLASSES = ["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]
METHODS = {
    "linear": ["--method", "linear"],
    "vpt": ["--method", "vpt"],
    "vfpt": ["--method", "vpt", "--prompt-transform", "fourier"],
    "tcpa": ["--method", "tcpa"],
    "vfpt_tcpa": ["--method", "tcpa", "--prompt-transform", "fourier"],
    "vfpt_tcpa_per_sample": ["--method", "tcpa", "--prompt-transform", "fourier", "--prompt-dropout-per-sample"],
}
PAIRS = [("vpt", "linear"), ("vfpt", "vpt"), ("tcpa", "vpt"), ("vfpt_tcpa", "tcpa"), ("vfpt_tcpa", "vfpt"),
         ("vfpt_tcpa_per_sample", "vfpt_tcpa")]


def finetune(args, threads):
    command = [sys.executable, "-m", "tcpa_kernels.finetune", "--data", "fashion-mnist", "--quiet", *MODEL, *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})


def transfer(method, seed, pretrained, run_dir, settings, threads):
    """One transfer run (reused when finished, resumed when interrupted); returns its log.json."""
    log = run_dir / "log.json"
    if not log.exists():
        epochs = settings.epochs
        schedule = ["--epochs", str(epochs), "--random-epochs", str(math.ceil(epochs / 10)),
                    "--warmup-epochs", str(math.ceil(epochs / 10))]
        where = ["--resume", str(run_dir)] if (run_dir / "last.safetensors").exists() else ["--out", str(run_dir)]
        finetune([*METHODS[method], "--classes", *TRANSFER_CLASSES, "--weights", str(pretrained), *schedule,
                  "--train-limit", str(settings.train_limit), "--seed", str(seed), *where], threads)
    return json.loads(log.read_text())


def summarize(runs):
    """Per method: mean/std of the final val accuracy, time per epoch, memory; per pair: differences per seed."""
    table = {}
    for method, logs in runs.items():
        accs = [log["val_acc"] for log in logs]
        table[method] = {"val_acc_mean": statistics.mean(accs),
                         "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "val_accs": accs,
                         "epoch_s_mean": statistics.mean(log["epoch_s_mean"] for log in logs),
                         "peak_memory_mb": max(log["peak_memory_mb"] for log in logs),
                         "memory_metric": logs[0]["memory_metric"],
                         "trainable_parameters": logs[0]["trainable_parameters"]}
    pairs = {}
    for a, b in PAIRS:
        if a in table and b in table:
            diffs = [x - y for x, y in zip(table[a]["val_accs"], table[b]["val_accs"], strict=True)]
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            pairs[f"{a} - {b}"] = {"diffs": diffs, "mean": statistics.mean(diffs), "std": std,
                                   "wins": sum(d > 0 for d in diffs), "n": len(diffs),
                                   "t": statistics.mean(diffs) / (std / math.sqrt(len(diffs))) if std > 0 else None}
    return table, pairs


def markdown(table, pairs):
    lines = ["| method | val acc (classes 5-9) | time / epoch (s) | peak memory (MB) | trainable params |",
             "|---|---|---|---|---|"]
    for method, r in table.items():
        lines.append(f"| {method} | {100 * r['val_acc_mean']:.2f} ± {100 * r['val_acc_std']:.2f} % "
                     f"(n={len(r['val_accs'])}) | {r['epoch_s_mean']:.1f} | {r['peak_memory_mb']:.0f} "
                     f"({r['memory_metric']}) | {r['trainable_parameters']:,} |")
    lines += ["", "| paired (same seed) | mean difference | std | A ahead | paired t |", "|---|---|---|---|---|"]
    for name, p in pairs.items():
        t = "-" if p["t"] is None else f"{p['t']:.2f}"
        lines.append(f"| {name} | {100 * p['mean']:+.2f} pp | {100 * p['std']:.2f} pp | {p['wins']} / {p['n']} "
                     f"| {t} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/fmnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10, help="transfer epochs")
    parser.add_argument("--train-limit", type=int, default=2500, help="training images for the transfer")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with cores // jobs threads)")
    settings = parser.parse_args()
    out = Path(settings.out)
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)

    pretrained = out / "pretrain" / "last.safetensors"
    if not (out / "pretrain" / "log.json").exists():
        finetune(["--method", "full", "--random-init", "--classes", *PRETRAIN_CLASSES,
                  "--epochs", str(settings.pretrain_epochs), "--warmup-epochs", "1", "--lr", "1e-3",
                  "--weight-decay", "1e-4", "--mixup", "0", "--out", str(out / "pretrain")], os.cpu_count() or 1)

    jobs = [(method, seed) for method in settings.methods for seed in settings.seeds]
    with ThreadPoolExecutor(settings.jobs) as pool:
        logs = list(pool.map(lambda job: transfer(*job, pretrained, out / f"{job[0]}_seed{job[1]}", settings,
                                                  threads), jobs))
    runs = {}
    for (method, _), log in zip(jobs, logs):
        runs.setdefault(method, []).append(log)
    table, pairs = summarize(runs)
    pretrain = json.loads((out / "pretrain" / "log.json").read_text())
    (out / "results.json").write_text(json.dumps({"settings": vars(settings), "threads_per_run": threads,
                                                  "pretrain_val_acc": pretrain["val_acc"], "results": table,
                                                  "paired": pairs}, indent=2))
    (out / "results.md").write_text(markdown(table, pairs))
    print(markdown(table, pairs))
    plot(table, out / "results.png")


def plot(table, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    methods = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("val_acc_mean", "val accuracy", "val_acc_std"), ("epoch_s_mean", "time / epoch (s)", None),
              ("peak_memory_mb", "peak memory (MB)", None))
    for ax, (key, title, err) in zip(axes, panels):
        ax.bar(methods, [table[m][key] for m in methods], yerr=[table[m][err] for m in methods] if err else None,
               color=[f"C{i}" for i in range(len(methods))], capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Fashion-MNIST transfer (pretrained on classes 0-4, frozen backbone)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
