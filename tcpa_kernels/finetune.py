"""Fine-tune a timm ViT with TCPA, VPT-deep, a linear probe or full fine-tuning, offline.

    python -m tcpa_kernels.finetune --data fashion-mnist --classes 5 6 7 8 9 --method tcpa \\
        --model vit_tiny_patch16_224 --model-kwargs '{"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}' \\
        --img-size 28 --weights runs/pretrain/checkpoint.safetensors --epochs 5
    python -m tcpa_kernels.finetune --data DIR ...      # DIR/train/<class>/*, DIR/val/<class>/*
    python -m tcpa_kernels.finetune --eval-only --checkpoint runs/finetune/checkpoint.safetensors \
        --data ... --weights ...

Defaults follow the published recipe: AdamW, linear warm-up then cosine decay, matching-loss weight 0.01,
random prompt selection for the first tenth of the epochs, prompt dropout 0.1, optional mixup.
Writes ``log.csv``, ``log.json``, ``curves.png`` and ``checkpoint.safetensors`` (only the trained tensors: prompts,
keys and head; everything for --method full) to --out.
"""

import argparse
import csv
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tcpa_kernels as tk
from tcpa_kernels import data
from tcpa_kernels.checkpoint import load_trainable, read_trainable, save_trainable

METHODS = ("tcpa", "vpt", "linear", "full")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tcpa-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name")
    p.add_argument("--model-kwargs", default="{}", help="JSON of timm.create_model overrides (patch_size, depth, ...)")
    p.add_argument("--weights", help="local backbone checkpoint (.safetensors, or a torch .pth/.pt state dict)")
    p.add_argument("--data", required=True, help="ImageFolder directory with train/ and val/, or 'fashion-mnist'")
    p.add_argument("--classes", type=int, nargs="+", help="fashion-mnist classes to use (relabelled 0..k-1)")
    p.add_argument("--train-limit", type=int, help="use at most this many training images (fixed subset)")
    p.add_argument("--val-limit", type=int, help="use at most this many validation images (fixed subset)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--method", choices=METHODS, default="tcpa")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 full, 1e-2 otherwise)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--random-epochs", type=int, help="TCPA: epochs of random selection first (default epochs//10)")
    p.add_argument("--match-weight", type=float, default=0.01, help="TCPA matching-loss weight")
    p.add_argument("--pool-size", type=int, default=18, help="TCPA entries per pool (CLS and image)")
    p.add_argument("--topk", type=int, default=10, help="TCPA entries each token selects")
    p.add_argument("--num-prompts", type=int, help="VPT prompts per layer (default: 2*pool-size, TCPA's budget)")
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"), help="TCPA kernel backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", default="runs/finetune", help="output folder")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the validation split")
    p.add_argument("--checkpoint", help="checkpoint written by this CLI (with --eval-only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    import timm

    if not timm.is_model(args.model):
        p.error(f"--model: expected a timm model name, got {args.model!r}")
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
        assert isinstance(args.model_kwargs, dict)
    except (json.JSONDecodeError, AssertionError):
        p.error(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    if args.data == "fashion-mnist":
        if not data.fashion_mnist_available():
            p.error(f"--data fashion-mnist: files not found under {data.FASHION_MNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
        if args.classes and not all(0 <= c < 10 for c in args.classes):
            p.error(f"--classes: expected Fashion-MNIST classes in 0..9, got {args.classes}")
    elif not all((Path(args.data) / split).is_dir() for split in ("train", "val")):
        p.error(f"--data: expected 'fashion-mnist' or a directory with train/ and val/ class folders, "
                f"got {args.data!r}")
    for name in ("weights", "checkpoint"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            p.error(f"--{name}: file not found: {path!r}")
    if args.eval_only and args.checkpoint is None:
        p.error("--checkpoint: required with --eval-only")
    for name in ("epochs", "batch_size", "img_size", "pool_size", "topk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.topk > args.pool_size:
        p.error(f"--topk: expected <= --pool-size ({args.pool_size}), got {args.topk}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device: expected auto, cpu or cuda (with a GPU present), got {args.device!r}")
    args.lr = args.lr if args.lr is not None else (1e-3 if args.method == "full" else 1e-2)
    args.random_epochs = args.random_epochs if args.random_epochs is not None else args.epochs // 10
    args.num_prompts = args.num_prompts or 2 * args.pool_size
    args.error = p.error
    return args


# ------------------------------------------------------------------------------------------ model


def load_backbone(model, path):
    """Load a local state dict, skipping head tensors of another shape; every backbone key must be present."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.startswith("head")]
    if missing:
        raise ValueError(f"--weights: {path} lacks backbone tensors of this model, e.g. {missing[:3]}")


def build_model(model_name, model_kwargs, img_size, num_classes, method, args, weights=None):
    import timm

    model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=num_classes,
                              **model_kwargs)
    if weights is not None:
        load_backbone(model, weights)
    model.eval()
    if method == "tcpa":
        tk.apply_tcpa(model, pool_size_cls=args["pool_size"], pool_size_img=args["pool_size"], topk_cls=args["topk"],
                      topk_img=args["topk"], prompt_dropout=args["prompt_dropout"], num_classes=num_classes,
                      backend=args["backend"])
    elif method == "vpt":
        tk.apply_vpt(model, num_prompts=args["num_prompts"], prompt_dropout=args["prompt_dropout"],
                     num_classes=num_classes)
    elif method == "linear":
        model.requires_grad_(False)
        model.reset_classifier(num_classes)
    else:
        model.reset_classifier(num_classes)
    return model


PROMPT_ARGS = ("pool_size", "topk", "num_prompts", "prompt_dropout", "backend")


def checkpoint_meta(args, num_classes, classes):
    return {"model": args.model, "model_kwargs": args.model_kwargs, "img_size": args.img_size, "method": args.method,
            "num_classes": num_classes, "classes": classes, "prompt_args": {k: getattr(args, k) for k in PROMPT_ARGS}}


CHECKPOINT_KEY = "tcpa_finetune"


def load_checkpoint(path, args):
    """Rebuild the model a checkpoint was trained with (backbone from --weights) and load its tensors."""
    try:
        meta, tensors = read_trainable(path, CHECKPOINT_KEY)
    except ValueError as error:
        args.error(f"--checkpoint: {error}")
    mismatch = {k: (meta[k], getattr(args, k)) for k in ("model", "model_kwargs", "img_size")
                if meta[k] != getattr(args, k)}
    if mismatch:
        args.error(f"--checkpoint: trained with another config: {{name: (checkpoint, given)}} = {mismatch}")
    model = build_model(meta["model"], meta["model_kwargs"], meta["img_size"], meta["num_classes"], meta["method"],
                        meta["prompt_args"], args.weights)
    try:
        load_trainable(model, tensors)
    except ValueError as error:
        args.error(f"--checkpoint: {error}")
    return model, meta


# -------------------------------------------------------------------------------------------- data


def _limit(ds, limit, seed):
    """A fixed random subset of at most ``limit`` items (keeps ``.classes``)."""
    if limit is None or limit >= len(ds):
        return ds
    subset = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[
        :limit].tolist())
    subset.classes = ds.classes
    return subset


def datasets(args, classes=None):
    if args.data == "fashion-mnist":
        train, val = (data.fashion_mnist(split, args.img_size, classes) for split in ("train", "val"))
    else:
        train, val = (data.image_folder(args.data, split, args.img_size) for split in ("train", "val"))
    return _limit(train, args.train_limit, args.seed), _limit(val, args.val_limit, args.seed)


def loader(ds, args, shuffle):
    g = torch.Generator().manual_seed(args.seed)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, generator=g,
                                       num_workers=args.workers, drop_last=False)


# ------------------------------------------------------------------------------------------ training


def lr_at(step, total, warmup, peak):
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KB on Linux)


def evaluate(model, val_loader, device, amp):
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for images, labels in val_loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    return loss_sum / max(1, total), correct / max(1, total)


def train(args):
    """Train (or, with --eval-only, evaluate); returns the summary dict also written to log.json."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp = AMP[args.amp]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ds, val_ds = datasets(args, args.classes)
    classes = list(train_ds.classes)
    if args.eval_only:
        model, meta = load_checkpoint(args.checkpoint, args)
        if meta["classes"] != classes:
            args.error(f"--checkpoint: trained on classes {meta['classes']}, data has {classes}")
        val_loss, val_acc = evaluate(model.to(device), loader(val_ds, args, False), device, amp)
        summary = {"eval_only": True, "checkpoint": args.checkpoint, "val_loss": val_loss, "val_acc": val_acc}
        print(json.dumps(summary))
        return summary

    model = build_model(args.model, args.model_kwargs, args.img_size, len(classes), args.method, vars(args),
                        args.weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    forward = torch.compile(model) if args.compile else model
    train_loader, val_loader = loader(train_ds, args, True), loader(val_ds, args, False)
    total_steps, warmup = args.epochs * len(train_loader), int(args.warmup_epochs * len(train_loader))
    history, step = [], 0
    for epoch in range(args.epochs):
        if args.method == "tcpa":
            tk.set_selection(model, "random" if epoch < args.random_epochs else "topk")
        model.train()
        start, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        bar = tqdm(train_loader, desc=f"{args.method} epoch {epoch + 1}/{args.epochs}", disable=args.quiet)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr)
            lam, perm = 1.0, None
            if args.mixup > 0:
                lam = float(torch.distributions.Beta(args.mixup, args.mixup).sample())
                perm = torch.randperm(len(labels), device=device)
                images = lam * images + (1 - lam) * images[perm]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = forward(images).float()
            loss = lam * F.cross_entropy(logits, labels)
            if perm is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, labels[perm])
            if args.method == "tcpa":
                loss = loss + args.match_weight * tk.get_matching_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        epoch_s = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, val_loader, device, amp)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "val_loss": val_loss, "val_acc": val_acc, "epoch_s": epoch_s,
                        "peak_memory_mb": peak_memory_mb(device)})
        if not args.quiet:
            print(json.dumps(history[-1]))

    save_trainable(model, out / "checkpoint.safetensors", CHECKPOINT_KEY, checkpoint_meta(args, len(classes), classes))
    write_logs(history, out, args)
    summary = {"method": args.method, "val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"],
               "epoch_s_mean": sum(h["epoch_s"] for h in history) / len(history),
               "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
               "memory_metric": "cuda_peak_allocated" if device.type == "cuda" else "process_peak_rss",
               "trainable_parameters": sum(p.numel() for p in params), "history": history,
               "args": {k: v for k, v in vars(args).items() if k != "error"}}
    (out / "log.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_logs(history, out, args):
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_acc", "val_acc"):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(f"{args.method}: {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
