"""Fine-tune a timm ViT with TCPA, VPT-deep (or VFPT), a linear probe or full fine-tuning, offline.

Usage:

    python -m tcpa_kernels.finetune --data DIR --model vit_base_patch16_224 --weights vit_b16.safetensors
        # DIR/train/<class>/*, DIR/val/<class>/*; TCPA with the recipe below; writes runs/finetune/<time>/
    python -m tcpa_kernels.finetune --data DIR --weights W --method vpt --prompt-transform fourier   # VFPT
    python -m tcpa_kernels.finetune --data fashion-mnist --classes 5 6 7 8 9 --img-size 28 \\
        --model vit_tiny_patch16_224 --model-kwargs '{"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}' \\
        --weights runs/pretrain/best.safetensors --epochs 10 --warmup-epochs 1 --random-epochs 1 --out runs/fm
    python -m tcpa_kernels.finetune --data fashion-mnist --random-init --epochs 1    # a first run on CPU, 32 px
    python -m tcpa_kernels.finetune --resume runs/fm               # continue after Ctrl-C, with the run's options
    python -m tcpa_kernels.finetune --resume runs/fm --epochs 20   # extend a finished run
    python -m tcpa_kernels.finetune --eval-only --checkpoint runs/fm --data fashion-mnist \\
        --weights runs/pretrain/best.safetensors                    # runs/fm/best.safetensors, the whole val split
    torchrun --nproc_per_node 4 -m tcpa_kernels.finetune --data DIR --weights W      # DDP, 4 processes

Defaults are the published TCPA recipe: AdamW, lr 0.004, weight decay 0.1, batch size 128 (at most the training
images), 100 epochs, warm-up from 0 for 10 % of --epochs (10) then cosine decay to 0 (set every step), random
prompt selection for the first 10 % of --epochs (--random-epochs, rounded down; the validation always selects top-k),
matching-loss weight 0.01, pools of 18 + 18 entries, top-10, prompt dropout 0.1, mixup alpha 0.8. The published code
also turns the prompts into Fourier prompts (VFPT+TCPA) with a dropout mask per sample: add --prompt-transform
fourier --prompt-dropout-per-sample (the defaults are the library's: none, one mask a batch). --recipe DATASET takes the
learning rate, weight decay and input prompter of that dataset's released script (sh/VFPT_TCPA_<dataset>.sh of the
TCPA code release, arXiv 2505.02406; the table RECIPES in this module); --lr, --weight-decay and --input-prompter /
--no-input-prompter given on the command line win over it, and the CLI prints which values came from the recipe.
--input-prompter adds the published image-space prompter before the patch embedding (apply_tcpa(...,
input_prompter=True); the released CUB script's). The rest follows timm's train.py: label smoothing 0.1, cutmix off,
and on ImageFolder data RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), flip 0.5, colour jitter 0.4, no
AutoAugment, no random erasing (timm's create_transform). Fashion-MNIST (grey, replicated to 3 channels) gets only
the flip, a batch at a time on tensors (data.py). Both are resized, centre-cropped and normalised with the model's
pretrained data config (timm's resolve_data_config; --img-size overrides the input size, --mean / --std the
normalisation). Fashion-MNIST on a
--random-init backbone defaults to its 28 px rounded up to the patch size (32 for patch 16), not 224 px (about 50x
the compute: 2 h 20 an epoch on a 2-core CPU). The start banner names every value derived this way. Full fine-tuning
usually wants a lower --lr.

Output (--out, default runs/finetune/<date-time>; an existing non-empty folder is refused unless resuming):
``last.safetensors`` after every epoch, ``best.safetensors`` (best validation accuracy), ``last_state.pt`` (what
--resume needs besides the tensors: optimizer and fp16 grad-scaler state, step, epoch, best accuracy, history, RNG
states of torch, CUDA, python and numpy), ``log.csv`` and ``log.json`` (every epoch), ``curves.png`` (at the end).
The checkpoints and the state are written to temp files in --out and moved into place together, so Ctrl-C (exit
code 130) leaves the last complete epoch's files. For tcpa/vpt a checkpoint is a save_prompts file
(``tk.load_prompts(timm.create_model(...), path)`` loads it); for linear/full it holds the trained tensors (full: all
of them). Both carry this CLI's record (every option, classes, data config, epoch, accuracy) as JSON under the
metadata key "tcpa_finetune".

--resume DIR takes the run's options for every option not given (only --data, --weights, --workers, --device,
--compile, --quiet, --out, --config (its values count as given) and --epochs may differ; it writes to the run's
folder) and ends with the tensors an uninterrupted run would have; a larger --epochs extends a run (the cosine
schedule then spans the new length).
--eval-only reads everything else from the checkpoint (--checkpoint DIR: DIR/best.safetensors): it needs --data and,
unless the checkpoint holds the whole model (full) or was trained on a --random-init backbone (rebuilt from the saved
--seed), --weights; it evaluates the whole validation split (--val-limit to take fewer) and prints the image count.

torchrun (WORLD_SIZE > 1): one process per device (nccl on CUDA, gloo on CPU), DistributedDataParallel, a
DistributedSampler; --batch-size is the global batch, each process takes --batch-size / world size (it must
divide). Validation is split over the processes and summed; rank 0 prints and writes.

Option names follow timm's train.py where the meaning is the same (--model, --img-size, --input-size 3 S S,
--num-classes (checked against the data's classes), --mean, --std, --epochs, --lr, --opt adamw|sgd, --momentum,
--weight-decay, --warmup-epochs, --warmup-lr, --min-lr, --clip-grad, --clip-mode, --smoothing, --mixup, --cutmix,
--aa, --reprob, --hflip, --scale, --ratio, --color-jitter, --seed, --resume), with its short forms -b
(--batch-size), -j (--workers) and -c (--config: a YAML file of option values, keys with underscores; options typed
on the command line win, and the file's values count as given). The defaults stay this CLI's: --opt adamw,
--warmup-lr 0, no clipping. Options only one --method reads (--topk, --random-epochs, --match-weight, --backend:
tcpa; --num-prompts: vpt; --pool-size, --prompt-dropout: tcpa or vpt), and --momentum (--opt sgd), are refused with
another method (optimizer) when given.

Bad options exit with code 2 before any data is read, with one line per bad option naming it, the expected and
the received value, and "(not given: a default)" where the user did not set it. --quiet: no banner, progress bars
or per-epoch lines (the files are written all the same).
"""

import argparse
import contextlib
import csv
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tcpa_kernels as tk
from tcpa_kernels import data
from tcpa_kernels._validate import MAX_POOL_ENTRIES, check_int, check_number
from tcpa_kernels.checkpoint import load_trainable, read_trainable, save_trainable

PROG = "tcpa-finetune"
METHODS = ("tcpa", "vpt", "linear", "full")
PROMPT_METHODS = ("tcpa", "vpt")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLI_KEY = "tcpa_finetune"  # safetensors metadata key of this CLI's record
LAST, BEST, STATE = "last.safetensors", "best.safetensors", "last_state.pt"
# ImageFolder augmentation defaults (timm's train.py); Fashion-MNIST refuses these options
IMAGE_FOLDER_AUGMENTATION = {"scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "color_jitter": 0.4, "aa": None,
                             "reprob": 0.0}
RESUME_FREE = ("data", "weights", "workers", "device", "compile", "quiet", "out", "resume", "epochs", "config")
RESUME_OWN = ("device", "out", "resume")  # what --resume does not take from the checkpoint when not given
DEFAULT_BATCH_SIZE = 128
DEFAULT_FRACTION = 0.1  # warm-up and random-selection epochs: the published 10 of 100 epochs
FASHION_MNIST_SIZE = 28
# Per-dataset presets of the released scripts sh/VFPT_TCPA_<dataset>.sh of the TCPA code release (arXiv 2505.02406):
# learning rate, weight decay and the input prompter (the CUB script only). Every script also uses what this CLI's
# defaults are: batch 128, mixup, 10 random-selection epochs, matching weight 0.01, pools of 18 + 18 entries, top-10,
# prompt length 1.
RECIPES = {
    "birds": {"lr": 0.001, "weight_decay": 0.5, "input_prompter": False},
    "cifar10": {"lr": 0.005, "weight_decay": 0.1, "input_prompter": False},
    "cifar100": {"lr": 0.004, "weight_decay": 0.1, "input_prompter": False},
    "cub": {"lr": 0.0015, "weight_decay": 0.5, "input_prompter": True},
    "dogs": {"lr": 0.004, "weight_decay": 0.5, "input_prompter": False},
    "dtd": {"lr": 0.01, "weight_decay": 0.1, "input_prompter": False},
    "flower": {"lr": 0.014, "weight_decay": 1.4, "input_prompter": False},
    "food": {"lr": 0.005, "weight_decay": 0.1, "input_prompter": False},
    "gtsrb": {"lr": 0.001, "weight_decay": 0.1, "input_prompter": False},
    "svhn": {"lr": 0.002, "weight_decay": 0.1, "input_prompter": False},
}
RECIPE_SOURCE = "sh/VFPT_TCPA_{}.sh of the TCPA code release, arXiv 2505.02406"
# what --recipe sets, and its value without a recipe (the general published recipe)
RECIPE_DEFAULTS = {"lr": 0.004, "weight_decay": 0.1, "input_prompter": False}
# options added after this CLI first wrote checkpoints: what a record without them means (--resume, --eval-only)
LATER_OPTIONS = {"recipe": None, "input_prompter": False, "input_size": None, "num_classes": None, "mean": None,
                 "std": None, "opt": "adamw", "momentum": 0.9, "warmup_lr": 0.0, "min_lr": 0.0, "clip_grad": None,
                 "clip_mode": "norm", "config": None}
OPTIMIZERS = ("adamw", "sgd")
CLIP = {"norm": nn.utils.clip_grad_norm_, "value": nn.utils.clip_grad_value_}  # --clip-mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder directory with train/ and val/, or 'fashion-mnist'")
    g.add_argument("--classes", type=int, nargs="+", help="fashion-mnist classes to use (relabelled 0..k-1)")
    g.add_argument("--train-limit", type=int, help="use at most this many training images (fixed subset)")
    g.add_argument("--val-limit", type=int, help="use at most this many validation images (fixed subset)")
    g.add_argument("--img-size", type=int,
                   help="input size (default: the model's pretrained config; fashion-mnist with --random-init: 28 px "
                        "rounded up to the patch size)")
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="timm's form of --img-size: 3 S S, 3 channels (Fashion-MNIST is replicated to RGB), square "
                        "(default: as --img-size)")
    g.add_argument("--num-classes", type=int, metavar="N",
                   help="must equal the number of classes of --data (after --classes), which sets it (default: the "
                        "data's)")
    g.add_argument("--mean", type=float, nargs=3, metavar="M",
                   help="normalisation mean, R G B (default: the model's pretrained config)")
    g.add_argument("--std", type=float, nargs=3, metavar="S",
                   help="normalisation std, R G B, each > 0 (default: the model's pretrained config)")
    g.add_argument("-j", "--workers", type=int, default=0,
                   help="data loader worker processes (default: 0; -j as timm's train.py)")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (default: vit_tiny_patch16_224)")
    g.add_argument("--model-kwargs", default="{}", help="JSON of timm.create_model overrides (patch_size, depth, ...)")
    g.add_argument("--weights", help="local backbone checkpoint (.safetensors, or a torch .pth/.pt state dict)")
    g.add_argument("--random-init", action="store_true", help="train on a randomly initialised backbone (no --weights)")
    g.add_argument("--method", choices=METHODS, default="tcpa",
                   help="tcpa | vpt (VPT-deep; VFPT with --prompt-transform fourier) | linear | full (default: tcpa)")
    g.add_argument("--pool-size", type=int, default=18, help="TCPA entries per pool, CLS and image (default: 18)")
    g.add_argument("--topk", type=int, default=10, help="TCPA entries each token selects (default: 10)")
    g.add_argument("--num-prompts", type=int, help="VPT prompts per layer (default: 2 x --pool-size, TCPA's budget)")
    g.add_argument("--prompt-dropout", type=float, default=0.1, help="dropout on the prompts (default: 0.1)")
    g.add_argument("--prompt-dropout-per-sample", action="store_true",
                   help="TCPA: a prompt-dropout mask per sample (default: one per batch)")
    g.add_argument("--prompt-transform", choices=("none", "fourier"), default="none",
                   help="tcpa/vpt: 'fourier' passes the prompts through an FFT as VFPT does (default: none)")
    g.add_argument("--fourier-fraction", type=float, default=1.0,
                   help="with --prompt-transform fourier: fraction of the prompts transformed, in (0, 1] (default: 1)")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"), help="TCPA kernel backend")
    g.add_argument("--input-prompter", action=argparse.BooleanOptionalAction,
                   help="tcpa/vpt: a trainable image-space prompter before the patch embedding, as the released CUB "
                        "script (default: off, or the --recipe's)")
    g = p.add_argument_group("training recipe")
    presets = ", ".join(f"{name} {r['lr']}/{r['weight_decay']}{' + input prompter' if r['input_prompter'] else ''}"
                        for name, r in RECIPES.items())
    g.add_argument("--recipe", choices=list(RECIPES), metavar="DATASET",
                   help=f"tcpa/vpt: the learning rate / weight decay (and input prompter) of the dataset's released "
                        f"script, {RECIPE_SOURCE.format('<dataset>')}: {presets}; --lr, --weight-decay and "
                        "--[no-]input-prompter given win")
    g.add_argument("--epochs", type=int, default=100, help="(default: 100)")
    g.add_argument("-b", "--batch-size", type=int,
                   help=f"global batch size (default: {DEFAULT_BATCH_SIZE}, at most the training images; -b as timm's "
                        "train.py)")
    g.add_argument("--opt", type=str.lower, default="adamw", metavar="{" + ",".join(OPTIMIZERS) + "}",
                   help="optimizer, case-insensitive; sgd: nesterov, with --momentum (default: adamw)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="--opt sgd: momentum (default: 0.9)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.004, or the --recipe's)")
    g.add_argument("--weight-decay", type=float,
                   help="weight decay, decoupled with adamw, L2 with sgd (default: 0.1, or the --recipe's)")
    g.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up, then cosine (default: 10 %% of --epochs, the published 10 of 100)")
    g.add_argument("--warmup-lr", type=float, default=0.0, metavar="LR",
                   help="learning rate the linear warm-up rises from to --lr (default: 0)")
    g.add_argument("--min-lr", type=float, default=0.0, metavar="LR",
                   help="learning rate the cosine decays to, at most --lr (default: 0)")
    g.add_argument("--clip-grad", type=float, metavar="X",
                   help="clip the trainable parameters' gradient to X > 0 before each step (default: none)")
    g.add_argument("--clip-mode", default="norm", metavar="{" + ",".join(CLIP) + "}",
                   help="with --clip-grad: clip the total norm or each value (default: norm)")
    g.add_argument("--random-epochs", type=int,
                   help="TCPA: epochs of random prompt selection first, < --epochs (default: 10 %% of --epochs, "
                        "rounded down)")
    g.add_argument("--match-weight", type=float, default=0.01, help="TCPA matching-loss weight (default: 0.01)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g = p.add_argument_group("augmentation (timm's names)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    g.add_argument("--scale", type=float, nargs=2, help="ImageFolder: RandomResizedCrop area range (default: 0.08 1)")
    g.add_argument("--ratio", type=float, nargs=2,
                   help="ImageFolder: RandomResizedCrop aspect range (default: 0.75 1.33)")
    g.add_argument("--color-jitter", type=float, help="ImageFolder: colour jitter strength (default: 0.4)")
    g.add_argument("--aa", help="ImageFolder: timm AutoAugment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    g.add_argument("--reprob", type=float, help="ImageFolder: random erasing probability (default: 0)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0: off (default: 0.8)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, 0: off (default: 0)")
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", metavar="FILE",
                   help="YAML file of option values (keys with underscores, e.g. batch_size: 64); options given on "
                        "the command line win")
    g.add_argument("--out", help="output folder (default: runs/finetune/<date-time>)")
    g.add_argument("--resume", help="output folder or last.safetensors of a run to continue with its options "
                                    "(--epochs may extend it)")
    g.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the validation split")
    g.add_argument("--checkpoint", help="with --eval-only: a checkpoint of this CLI, or an output folder (its "
                                        "best.safetensors)")
    g.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast dtype (default: none)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    g.add_argument("--quiet", action="store_true",
                   help="no banner, progress bars or per-epoch lines (the files are written all the same)")
    return p


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def fail(message: str):
    """Exit with code 2 and ``message`` (which names the option), as argparse does for its own errors."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_meta(path, name: str) -> dict:
    """This CLI's record in a checkpoint (``name``: the option that gave the path)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(CLI_KEY)
    except Exception as error:  # safetensors raises its own error type for files of another format
        fail(f"{name}: {path} is not a safetensors file ({error})")
    if meta is None:
        fail(f"{name}: {path} is not a checkpoint of this CLI (no '{CLI_KEY}' metadata)")
    return json.loads(meta)


def read_state(path) -> dict:
    """--resume: the run's last_state.pt (exit 2 naming --resume when it cannot be read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors of a truncated or foreign file
        fail(f"--resume: expected a complete {STATE} written by this CLI, got {str(path)!r}, which cannot be read "
             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if not isinstance(state, dict) or not {"progress", "optimizer", "scaler", "rng"} <= set(state):
        fail(f"--resume: expected a {STATE} written by this CLI, got {str(path)!r} without its keys")
    return state


def resume_paths(resume: str) -> tuple[Path, Path]:
    """(checkpoint, state file) of --resume DIR_OR_FILE."""
    path = Path(resume)
    path = path / LAST if path.is_dir() else path
    return path, path.with_name(path.name.removesuffix(".safetensors") + "_state.pt")


def given_options(argv) -> set[str]:
    """The names (dests) of the options on the command line: a parse with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv) -> argparse.Namespace:
    """Parse and check every option (exit 2 naming every bad one); --config: the file's values where not given (they
    count as given); --eval-only: the checkpoint's options; --resume: the run's options where not given."""
    args = build_parser().parse_args(argv)
    if args.config is not None:
        argv = [*config_argv(args.config), *argv]
        args = build_parser().parse_args(argv)
    given = given_options(argv)
    if args.resume is not None:
        take_run_options(args, given)
    from_recipe = resolve_recipe(args)
    check_options(args, given)
    if args.eval_only:
        return eval_args(args)
    if args.recipe is not None and int(os.environ.get("RANK", "0")) == 0:
        print(recipe_line(args, from_recipe))
    if args.resume is not None:
        check_resume(args, given)
    elif args.out is None:
        args.out = str(Path("runs/finetune") / time.strftime("%Y%m%d-%H%M%S"))
    check_out(args.out)
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()) and args.resume is None:
        fail(f"--out: {args.out} exists and is not empty (continue a run with --resume {args.out})")
    return args


def config_argv(path: str) -> list[str]:
    """-c/--config FILE (timm's YAML config): its values as command-line arguments, to go before the typed ones,
    which then win. Its keys are option names with underscores (batch_size: 64)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        fail(f"--config: expected a readable YAML file, got {path!r} ({type(error).__name__}: "
             f"{str(error).splitlines()[0] if str(error) else ''})")
    values = {} if values is None else values
    if not isinstance(values, dict):
        fail(f"--config: expected a YAML mapping of option names to values, got {path!r} holding "
             f"{type(values).__name__}")
    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "config")}
    unknown = [str(key) for key in values if key not in actions]
    if unknown:
        fail(f"--config: expected option names with underscores (e.g. batch_size) as the keys of {path!r}, got "
             f"unknown keys {', '.join(unknown)}")
    argv = []
    for key, value in values.items():
        if value is None:  # the default
            continue
        if actions[key].nargs == 0:  # a flag: true sets it, false its --no- form where it has one
            if not isinstance(value, bool):
                fail(f"--config: expected true or false for {key} in {path!r}, got {value!r}")
            argv += [o for o in actions[key].option_strings if o.startswith("--no-") != value]
        else:
            items = value if isinstance(value, list) else [value]
            argv += [option(key), *(json.dumps(v) if isinstance(v, dict) else str(v) for v in items)]
    return argv


def record(args) -> dict:
    """The options as saved in checkpoints and logs (not the private notes, keys starting with '_')."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def resolve_recipe(args) -> dict:
    """Fill --lr, --weight-decay and --input-prompter: as given, else the --recipe's, else the default; returns the
    values the recipe set."""
    recipe = RECIPES.get(args.recipe, {})
    from_recipe = {name: recipe[name] for name in recipe if getattr(args, name) is None}
    for name, default in RECIPE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, from_recipe.get(name, default))
    return from_recipe


def recipe_line(args, from_recipe: dict) -> str:
    """What --recipe set and what the command line kept, for the user."""
    def shown(name, value):
        return f"--{'' if value else 'no-'}input-prompter" if name == "input_prompter" else f"{option(name)} {value}"

    line = f"{PROG}: from --recipe {args.recipe} ({RECIPE_SOURCE.format(args.recipe)}): " + (", ".join(
        shown(name, value) for name, value in from_recipe.items()) or "nothing")
    given = [shown(name, getattr(args, name)) for name in RECIPE_DEFAULTS if name not in from_recipe]
    return line + (f"; as given: {', '.join(given)}" if given else "")


def check_options(args, given: set[str]) -> None:
    """Check every option, exiting 2 with one line per bad option; fill the derived defaults, with a note of each
    in ``args._defaults`` (option -> why) for the start banner."""
    import timm

    errors: list[str] = []

    def number(name, lo, hi=math.inf, **bounds):
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                try:
                    check_number(option(name), v, lo=lo, hi=hi, **bounds)
                except ValueError as error:
                    errors.append(str(error))

    def integer(name, lo, hi=None):
        if getattr(args, name) is not None:
            try:
                check_int(option(name), getattr(args, name), lo, hi)
            except ValueError as error:
                errors.append(str(error))

    args._defaults = {}
    if not timm.is_model(args.model):
        errors.append(f"--model: expected a timm model name, got {args.model!r}")
    if isinstance(args.model_kwargs, str):  # a resumed run's record holds the parsed object
        try:
            args.model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError:
            errors.append(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    if not isinstance(args.model_kwargs, dict) or {"img_size", "num_classes"} & set(args.model_kwargs):
        if not isinstance(args.model_kwargs, str):
            errors.append(f"--model-kwargs: expected a JSON object without img_size / num_classes (use --img-size; "
                          f"the classes come from --data), got {args.model_kwargs!r}")
        args.model_kwargs = {}
    if args.input_size is not None:
        channels, height, width = args.input_size
        if channels != 3 or height != width or height < 1:
            errors.append(f"--input-size: expected 3 S S (3 channels, a square size S >= 1 as --img-size), got "
                          f"{args.input_size}")
        elif args.img_size is None:
            args.img_size = height
        elif args.img_size != height:
            errors.append(f"--input-size: expected 3 {args.img_size} {args.img_size} (--img-size {args.img_size}), "
                          f"got {args.input_size}")
    for name in ("epochs", "batch_size", "img_size", "num_prompts", "train_limit", "val_limit", "num_classes"):
        integer(name, 1)
    epochs = args.epochs if args.epochs >= 1 else 1
    if args.warmup_epochs is None:
        args.warmup_epochs = DEFAULT_FRACTION * epochs
        args._defaults["warmup_epochs"] = "10 % of --epochs"
    if args.random_epochs is None:
        args.random_epochs = int(DEFAULT_FRACTION * epochs)
        args._defaults["random_epochs"] = "10 % of --epochs, rounded down"
    integer("pool_size", 1, MAX_POOL_ENTRIES // 2)  # both pools take --pool-size entries
    integer("topk", 1, args.pool_size if args.method == "tcpa" else None)  # only TCPA reads it
    integer("workers", 0)
    integer("random_epochs", 0)
    integer("seed", 0, 2**32 - 1)
    number("lr", 0.0, lo_open=True)
    for name in ("warmup_lr", "min_lr"):
        number(name, 0.0)
    if args.lr > 0 and args.min_lr > args.lr:
        errors.append(f"--min-lr: expected at most --lr ({args.lr}), got {args.min_lr}")
    number("momentum", 0.0, 1.0, lo_open=True)
    number("clip_grad", 0.0, lo_open=True)
    number("mean", -math.inf)
    number("std", 0.0, lo_open=True)
    for name, values in (("opt", OPTIMIZERS), ("clip_mode", CLIP)):
        if getattr(args, name) not in values:
            errors.append(f"{option(name)}: expected {' or '.join(values)}, got {getattr(args, name)!r}")
    number("warmup_epochs", 0.0, args.epochs, hi_open=False)
    for name in ("weight_decay", "match_weight", "color_jitter", "mixup", "cutmix"):
        number(name, 0.0)
    number("prompt_dropout", 0.0, 1.0)
    number("smoothing", 0.0, 1.0)
    number("fourier_fraction", 0.0, 1.0, lo_open=True, hi_open=False)
    for name in ("hflip", "reprob"):
        number(name, 0.0, 1.0, hi_open=False)
    number("scale", 0.0, 1.0, lo_open=True, hi_open=False)
    number("ratio", 0.0, lo_open=True)
    for name in ("scale", "ratio"):
        if getattr(args, name) is not None and getattr(args, name)[0] > getattr(args, name)[1]:
            errors.append(f"{option(name)}: expected MIN MAX with MIN <= MAX, got {getattr(args, name)}")
    if args.method == "tcpa" and args.random_epochs >= args.epochs:
        errors.append(f"--random-epochs: expected fewer than --epochs ({args.epochs}) for tcpa, "
                      f"got {args.random_epochs}")
    if args.prompt_dropout_per_sample and args.method != "tcpa":
        errors.append(f"--prompt-dropout-per-sample: applies to --method tcpa only, got --method {args.method}")
    if args.prompt_transform != "none" and args.method not in PROMPT_METHODS:
        errors.append(f"--prompt-transform: applies to --method tcpa or vpt, got --method {args.method}")
    if args.fourier_fraction != 1.0 and args.prompt_transform != "fourier":
        errors.append(f"--fourier-fraction: applies with --prompt-transform fourier, got {args.fourier_fraction}")
    if "clip_mode" in given and args.clip_grad is None:
        errors.append(f"--clip-mode: applies with --clip-grad, got {args.clip_mode}")
    if args.method not in PROMPT_METHODS and (args.recipe is not None or args.input_prompter):
        name = "--recipe" if args.recipe is not None else "--input-prompter"
        errors.append(f"{name}: applies to --method tcpa or vpt, got --method {args.method}")
    errors += check_dependent_options(args, given)
    errors += check_data(args)
    if not any(e.startswith(("--model", "--img-size", "--input-size")) for e in errors):
        errors += check_model(args)
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        args.checkpoint = str(Path(args.checkpoint) / BEST)
    for name in ("weights", "checkpoint"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            errors.append(f"{option(name)}: file not found: {path!r}")
    if args.eval_only != (args.checkpoint is not None):
        errors.append("--checkpoint: required with --eval-only" if args.eval_only else
                      "--checkpoint: only with --eval-only (--resume continues a run)")
    if args.eval_only and args.resume is not None:
        errors.append("--resume: not with --eval-only")
    if not args.eval_only and (args.weights is None) == (not args.random_init):
        errors.append("--weights: required (a local backbone checkpoint), or --random-init to train on a random "
                      "backbone" if args.weights is None else "--random-init: not with --weights (one backbone)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.eval_only and args.batch_size is not None and args.batch_size % world:
        errors.append(f"--batch-size: expected a multiple of the {world} processes (each takes an equal share), "
                      f"got {args.batch_size}")
    elif not args.eval_only and args.batch_size and mixing(args) and (args.batch_size // world) % 2:
        errors.append(f"--batch-size: mixup/cutmix need an even batch per process, got {args.batch_size} over "
                      f"{world}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        errors.append(f"--device: expected auto, cpu or cuda (with a GPU present), got {args.device!r}")
    if errors:
        origin = "the run's value (--resume)" if args.resume is not None else "a default"
        fail(f"\n{PROG}: error: ".join(e + (f" (not given: {origin})" if not_given(e, args, given) else "")
                                        for e in errors))
    if args.img_size is None:
        args.img_size = default_img_size(args)
    args.num_prompts = args.num_prompts or 2 * args.pool_size


# options that only some values of another option read (--method, --opt): refused with another value when given
DEPENDENT_OPTIONS = {"method": {"topk": ("tcpa",), "random_epochs": ("tcpa",), "match_weight": ("tcpa",),
                                "backend": ("tcpa",), "pool_size": PROMPT_METHODS,  # vpt: the default of --num-prompts
                                "num_prompts": ("vpt",), "prompt_dropout": PROMPT_METHODS},
                     "opt": {"momentum": ("sgd",)}}


def check_dependent_options(args, given: set[str]) -> list[str]:
    """The options given on the command line (or --config) that --method or --opt does not read."""
    errors = []
    for owner, options in DEPENDENT_OPTIONS.items():
        for name, values in options.items():
            if name in given and getattr(args, owner) not in values:
                errors.append(f"{option(name)}: applies to {option(owner)} {' or '.join(values)}, got {option(owner)} "
                              f"{getattr(args, owner)} ({option(name)} {getattr(args, name)})")
    return errors


def check_model(args) -> list[str]:
    """--model (with --model-kwargs and --img-size): a timm ViT this CLI and --method can train, built on the meta
    device (no memory, no weights) to find out."""
    import timm

    from tcpa_kernels.vit import _check_model

    if not timm.is_model(args.model) or not isinstance(args.model_kwargs, dict):
        return []
    size = {"img_size": args.img_size} if isinstance(args.img_size, int) and args.img_size >= 1 else {}
    try:
        with torch.device("meta"):
            model = timm.create_model(args.model, pretrained=False, **size, **args.model_kwargs)
    except Exception as error:  # timm raises whatever the model class does (TypeError, AssertionError, ...)
        return [f"--model: expected a timm ViT that takes img_size and the --model-kwargs, got {args.model!r} "
                f"({type(error).__name__}: {error})"]
    if args.method in PROMPT_METHODS:
        try:
            _check_model(model)
        except (TypeError, ValueError):
            return [f"--model: expected a timm ViT that --method {args.method} supports (VisionTransformer, DeiT, "
                    f"Eva: README, 'Supported models'), got {args.model!r} ({type(model).__name__})"]
    return []


def check_out(out: str) -> None:
    """--out: a folder (or a path below a folder) this process can write to."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        fail(f"--out: expected a folder, got {out!r}, which is a file")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        fail(f"--out: expected a folder that can be created, got {out!r}, below the file {str(parent)!r}")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        fail(f"--out: expected a writable folder, got {out!r}: cannot write to {str(parent)!r} ({error.strerror})")


def not_given(error: str, args, given: set[str]) -> bool:
    """Whether the option an error message names (its first word) has a value the command line did not give."""
    name = error.split(":")[0].split()[0].removeprefix("--").replace("-", "_")
    return name not in given and getattr(args, name, None) is not None


def mixing(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0


def patch_size(args) -> int:
    """The model's patch size: --model-kwargs', else the one its name gives (vit_*_patch16_*), else 16."""
    import re

    found = re.search(r"patch(\d+)", args.model)
    return int(args.model_kwargs.get("patch_size", found.group(1) if found else 16))


def default_img_size(args) -> int:
    """Fashion-MNIST on a --random-init backbone: its 28 px rounded up to the patch size (no pretrained position
    embedding to match; 224 px would cost ~60x the compute); otherwise the model's pretrained input size."""
    import timm

    if args.data == data.FASHION_MNIST and args.random_init:
        patch = patch_size(args)
        args._defaults["img_size"] = f"Fashion-MNIST's {FASHION_MNIST_SIZE} px rounded up to the patch size {patch}"
        return -(-FASHION_MNIST_SIZE // patch) * patch
    cfg = timm.models.get_pretrained_cfg(args.model)
    return cfg.input_size[-1] if cfg is not None and cfg.input_size else 224


def check_data(args) -> list[str]:
    """The errors of --data and the options that depend on it."""
    if args.data is None:
        return ["--data: required (an ImageFolder directory with train/ and val/, or 'fashion-mnist')"]
    errors = []
    if args.data == data.FASHION_MNIST:
        if not data.fashion_mnist_available():
            errors.append(f"--data fashion-mnist: files not found under {data.FASHION_MNIST_DIR} "
                          "(apt-get install dataset-fashion-mnist)")
        if args.classes is not None and (not all(0 <= c < 10 for c in args.classes)
                                         or len(set(args.classes)) != len(args.classes)):
            errors.append(f"--classes: expected distinct Fashion-MNIST classes in 0..9, got {args.classes}")
        for name in IMAGE_FOLDER_AUGMENTATION:
            if getattr(args, name) is not None:
                errors.append(f"{option(name)}: applies to ImageFolder data (Fashion-MNIST is augmented with "
                              f"--hflip, --mixup, --cutmix, --smoothing), got {getattr(args, name)}")
        return errors + check_num_classes(args, len(args.classes or data.FASHION_MNIST_CLASSES))
    if not all((Path(args.data) / split).is_dir() for split in ("train", "val")):
        errors.append(f"--data: expected 'fashion-mnist' or a directory with train/ and val/ class folders, "
                      f"got {args.data!r}")
    else:  # ImageFolder's classes: the folders in train/
        errors += check_num_classes(args, sum(path.is_dir() for path in (Path(args.data) / "train").iterdir()))
    if args.classes is not None:
        errors.append(f"--classes: applies to --data fashion-mnist (an ImageFolder's classes are its folders), "
                      f"got {args.classes}")
    for name, default in IMAGE_FOLDER_AUGMENTATION.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        data.timm_transform({"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.5,) * 3,
                             "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}, augmentation(args))
    except (AssertionError, KeyError, ValueError, TypeError) as error:
        errors.append(f"--aa: expected a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1), got {args.aa!r} "
                      f"({error})")
    return errors


def check_num_classes(args, classes: int) -> list[str]:
    """--num-classes (timm's), when given: the number of ``classes`` of --data, which sets it."""
    if args.num_classes is None or args.num_classes == classes:
        return []
    return [f"--num-classes: expected {classes} (the classes of --data {args.data}"
            f"{' --classes' if args.classes is not None else ''}), got {args.num_classes}"]


def take_run_options(args, given: set[str]) -> None:
    """--resume: the run's recorded options for every option not given (but --device, --out)."""
    path, state = resume_paths(args.resume)
    for p in (path, state):
        if not p.is_file():
            fail(f"--resume: {p} not found (expected an output folder or a last.safetensors of this CLI)")
    saved = LATER_OPTIONS | read_meta(path, "--resume")["args"]
    for name, value in saved.items():
        if name not in given and name not in RESUME_OWN and hasattr(args, name):
            setattr(args, name, value)


def check_resume(args, given: set[str]) -> None:
    """--resume: the options given (other than RESUME_FREE) are the run's; --epochs may only extend it."""
    path, _ = resume_paths(args.resume)
    meta = read_meta(path, "--resume")
    saved, now = LATER_OPTIONS | meta["args"], json.loads(json.dumps(record(args)))
    differ = [f"{option(k)} {saved.get(k)!r} (given: {now[k]!r})" for k in sorted(given & set(now))
              if k not in RESUME_FREE and saved.get(k) != now[k]]
    if differ:
        fail(f"--resume: the checkpoint was trained with other options: {', '.join(differ)}")
    if args.epochs < meta["epoch"]:
        fail(f"--epochs: expected at least the {meta['epoch']} epochs the run has done, got {args.epochs}")
    if args.out is not None and Path(args.out).resolve() != path.parent.resolve():
        fail(f"--out: a resumed run writes to its own folder {path.parent}, got {args.out}")
    args.out = str(path.parent)


def eval_args(args) -> argparse.Namespace:
    """The options of --eval-only: the checkpoint's, with --data, --weights, --val-limit and the run options."""
    meta = read_meta(args.checkpoint, "--checkpoint")
    saved = LATER_OPTIONS | meta["args"]
    needs_weights = saved["method"] != "full" and not saved["random_init"]
    if args.random_init:
        fail("--random-init: not with --eval-only (the checkpoint says how its backbone was made)")
    if needs_weights and args.weights is None:
        fail(f"--weights: required: the checkpoint was trained on the backbone {saved['weights']!r}")
    if not needs_weights and args.weights is not None:
        why = "holds the whole model" if saved["method"] == "full" else "was trained on a --random-init backbone"
        fail(f"--weights: not used: the checkpoint {why}, got {args.weights!r}")
    if args.data != saved["data"] and data.FASHION_MNIST in (args.data, saved["data"]):
        fail(f"--data: the checkpoint was trained on {saved['data']!r}, got {args.data!r}")
    given = {"data": args.data, "weights": args.weights, "workers": args.workers, "device": args.device,
             "quiet": args.quiet, "eval_only": True, "checkpoint": args.checkpoint,
             "val_limit": args.val_limit}  # the whole split unless given, whatever the run used
    return argparse.Namespace(**{**saved, **given, "checkpoint_meta": meta})


def augmentation(args) -> dict:
    """timm create_transform's training keyword arguments (Fashion-MNIST reads only hflip)."""
    if args.data == data.FASHION_MNIST:
        return {"hflip": args.hflip}
    return {"hflip": args.hflip, "scale": tuple(args.scale), "ratio": tuple(args.ratio),
            "color_jitter": args.color_jitter, "auto_augment": args.aa, "re_prob": args.reprob}


# ------------------------------------------------------------------------------------------ model


def load_backbone(model: nn.Module, path) -> None:
    """Load a local state dict, skipping head tensors of another shape; every backbone key must be present."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
    except Exception as error:  # safetensors, zip and pickle readers each raise their own error types
        fail(f"--weights: expected a complete .safetensors file or torch state dict, got {str(path)!r}, which cannot "
             f"be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"--weights: expected a state dict (name -> tensor), got {str(path)!r} holding {type(state).__name__}")
    own = model.state_dict()
    other = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and own[k].shape != v.shape and not k.startswith("head")}
    if other:
        shapes = "; ".join(f"{k}: saved {saved}, expected {expected}"
                           for k, (saved, expected) in list(other.items())[:3])
        hint = (" (the position embedding: --img-size and the patch size must be those the weights were trained "
                "with)" if any("pos_embed" in k for k in other) else "")
        fail(f"--weights: {path} holds backbone tensors of another shape than this model (--img-size "
             f"{img_size(model)}) expects: {shapes}{hint}")
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.startswith("head")]
    if missing:
        fail(f"--weights: {path} lacks backbone tensors of this model, e.g. {missing[:3]}")


def img_size(model: nn.Module):
    """The input size a timm ViT was built for (its patch embedding's), or '?'."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return size[-1] if isinstance(size, (tuple, list)) else size or "?"


def create_backbone(args) -> nn.Module:
    """The timm model with --weights, or (--random-init) initialised from --seed so --eval-only can rebuild it."""
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, **args.model_kwargs)
    if args.weights is not None:
        load_backbone(model, args.weights)
    return model.eval()


def add_method(model: nn.Module, args, num_classes: int) -> nn.Module:
    """TCPA / VPT-deep prompts and a new head, or a new head only (linear: the rest frozen)."""
    if args.method == "tcpa":
        tk.apply_tcpa(model, pool_size_cls=args.pool_size, pool_size_img=args.pool_size, topk_cls=args.topk,
                      topk_img=args.topk, prompt_dropout=args.prompt_dropout,
                      prompt_dropout_per_sample=args.prompt_dropout_per_sample,
                      prompt_transform=args.prompt_transform, fourier_fraction=args.fourier_fraction,
                      num_classes=num_classes, backend=args.backend, input_prompter=args.input_prompter)
    elif args.method == "vpt":
        tk.apply_vpt(model, num_prompts=args.num_prompts, deep=True, prompt_dropout=args.prompt_dropout,
                     prompt_transform=args.prompt_transform, fourier_fraction=args.fourier_fraction,
                     num_classes=num_classes, input_prompter=args.input_prompter)
    else:
        model.requires_grad_(args.method == "full")
        model.reset_classifier(num_classes)
    return model


def write_checkpoint(model: nn.Module, path, method: str, meta: dict) -> None:
    """tcpa/vpt: a save_prompts file; linear/full: the trained tensors; both with ``meta`` under CLI_KEY."""
    if method in PROMPT_METHODS:
        tk.save_prompts(model, path, {CLI_KEY: meta})
    else:
        save_trainable(model, path, {CLI_KEY: meta})


def load_tensors(model: nn.Module, path, method: str, name: str) -> None:
    """Load a write_checkpoint file into ``model`` (tcpa/vpt: a plain backbone is patched by load_prompts)."""
    try:
        if method in PROMPT_METHODS:
            tk.load_prompts(model, path)
        else:
            load_trainable(model, read_trainable(path, CLI_KEY)[1])
    except ValueError as error:
        fail(f"{name}: {error}")


# -------------------------------------------------------------------------------------------- data


def _limit(ds, limit, seed):
    """A fixed random subset of at most ``limit`` items (keeps ``.classes``)."""
    if limit is None or limit >= len(ds):
        return ds
    subset = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[
        :limit].tolist())
    subset.classes = ds.classes
    return subset


def load_data(args, data_config: dict):
    """(train, val, class names), limited by --train-limit / --val-limit."""
    train, val = data.datasets(args.data, data_config, augmentation(args), args.classes)
    if train.classes != val.classes:
        fail(f"--data: train/ and val/ hold different classes: {train.classes} and {val.classes}")
    return _limit(train, args.train_limit, args.seed), _limit(val, args.val_limit, args.seed), list(train.classes)


def val_loader(ds, batch_size, args, rank, world):
    """This process's share of the validation set (every world-th image: no padding, so the counts add up)."""
    share = torch.utils.data.Subset(ds, range(rank, len(ds), world))
    return torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=args.workers)


# ------------------------------------------------------------------------------------------ training


def lr_at(step: int, total: int, warmup: int, peak: float, start: float = 0.0, end: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup`` steps (the first step takes 1 / ``warmup`` of the
    way, the last reaches ``peak``), then cosine decay to ``end`` (reached after the last step)."""
    if step < warmup:
        return start + (peak - start) * (step + 1) / warmup
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def create_optimizer(params, args) -> torch.optim.Optimizer:
    """--opt adamw (decoupled weight decay) or sgd (timm's: nesterov, --momentum; L2 weight decay)."""
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KB on Linux)


def all_sum(values: list[float], world: int, device) -> list[float]:
    """``values`` summed over the processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def evaluate(model, loader, device, amp, method, world) -> tuple[float, float]:
    """(loss, accuracy) over the whole validation set, with top-k selection (TCPA); the training loop sets its
    own selection mode again at the start of each epoch."""
    if method == "tcpa":
        tk.set_selection(model, "topk")
    model.eval()
    loss_sum = correct = total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    loss_sum, correct, total = all_sum([loss_sum, correct, total], world, device)
    return loss_sum / max(1, total), correct / max(1, total)


def rng_state() -> dict:
    """torch (CPU, CUDA), python and numpy RNG states, as tensors and plain values (torch.load weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    numpy = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C waits until the block is done (its files are moved into place together)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def save_epoch(out: Path, writers: dict) -> None:
    """Write each file of ``writers`` (name -> function of a path) to a temp file in ``out``, then move them all
    into place; an interruption before the move leaves the previous files as they were."""
    temps = {name: out / f".{name}.tmp" for name in writers}
    try:
        for name, write in writers.items():
            write(temps[name])
        with sigint_deferred():
            for name, temp in temps.items():
                os.replace(temp, out / name)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun (WORLD_SIZE > 1) the process group is set up first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    local = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if device == "cuda" else "cpu")


def train(args) -> dict:
    """Train (or, with --eval-only, evaluate); returns the summary dict also written to log.json."""
    rank, world, device = init_distributed(args.device)
    try:
        return (evaluate_checkpoint if args.eval_only else fit)(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def evaluate_checkpoint(args, rank, world, device) -> dict:
    meta = args.checkpoint_meta
    model = create_backbone(args)
    _, val_ds, classes = load_data(args, meta["data_config"])
    if classes != meta["classes"]:
        fail(f"--data: the checkpoint was trained on classes {meta['classes']}, {args.data} has {classes}")
    if args.method not in PROMPT_METHODS:
        add_method(model, args, len(classes))
    load_tensors(model, args.checkpoint, args.method, "--checkpoint")
    loader = val_loader(val_ds, meta["batch_per_process"], args, rank, world)
    val_loss, val_acc = evaluate(model.to(device), loader, device, AMP[args.amp], args.method, world)
    summary = {"eval_only": True, "checkpoint": args.checkpoint, "epoch": meta["epoch"], "images": len(val_ds),
               "val_loss": val_loss, "val_acc": val_acc}
    if rank == 0:
        print(json.dumps(summary))
    return summary


def fit(args, rank, world, device) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from tqdm import tqdm

    main = rank == 0
    seed_everything(args.seed)
    amp, out = AMP[args.amp], Path(args.out)
    model = create_backbone(args)
    if args.resume is not None:  # read before the data: a damaged file ends the run at once
        checkpoint, state_file = resume_paths(args.resume)
        state = read_state(state_file)
    data_config = data.model_data_config(model, args.img_size) | {
        name: getattr(args, name) for name in ("mean", "std") if getattr(args, name) is not None}
    train_ds, val_ds, classes = load_data(args, data_config)
    model = add_method(model, args, len(classes)).to(device)
    if args.batch_size is None:
        args.batch_size = default_batch_size(len(train_ds), world, mixing(args))
        vars(args).setdefault("_defaults", {})["batch_size"] = f"{DEFAULT_BATCH_SIZE}, at most the training images"
    per_process = args.batch_size // world
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, seed=args.seed,
                                                  drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=per_process, sampler=sampler,
                                               num_workers=args.workers, drop_last=True)
    if len(train_loader) == 0:
        fail(f"--batch-size: expected at most the {len(train_ds)} training images, got {args.batch_size}")
    eval_loader = val_loader(val_ds, per_process, args, rank, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(params, args)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=len(classes)) if args.mixup > 0 or args.cutmix > 0 else None
    soft_loss = SoftTargetCrossEntropy()
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)  # fp16 gradients would underflow
    total_steps, warmup = args.epochs * len(train_loader), int(args.warmup_epochs * len(train_loader))
    progress = {"epoch": 0, "step": 0, "best_acc": -1.0, "best_epoch": 0, "history": []}
    if args.resume is not None:
        load_tensors(model, checkpoint, args.method, "--resume")
        saved = read_meta(checkpoint, "--resume")
        if saved["classes"] != classes:
            fail(f"--data: the run was trained on classes {saved['classes']}, {args.data} has {classes}")
        if state["progress"]["epoch"] != saved["epoch"]:
            fail(f"--resume: {checkpoint} and {state_file} are of different epochs")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        progress = state["progress"]
    elif main:
        out.mkdir(parents=True, exist_ok=True)
    if main and not args.quiet:
        print(banner(args, len(train_ds), len(val_ds), len(classes), params, device, out))
    history, step, wrapped = progress["history"], progress["step"], None
    forward = torch.compile(model) if args.compile else model
    run_start, eta_step = time.perf_counter(), step + min(ETA_STEPS, len(train_loader))
    for epoch in range(progress["epoch"], args.epochs):
        mode = "random" if args.method == "tcpa" and epoch < args.random_epochs else "topk"
        if args.method == "tcpa":
            tk.set_selection(model, mode)
        if world > 1 and wrapped != mode:  # random selection leaves the keys without gradients: DDP must know
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode == "random")
            forward, wrapped = torch.compile(ddp) if args.compile else ddp, mode
        sampler.set_epoch(epoch)
        model.train()
        start, sums = time.perf_counter(), [0.0, 0.0, 0.0]  # loss, correct, seen
        bar = tqdm(train_loader, desc=f"{args.method} epoch {epoch + 1}/{args.epochs}", disable=args.quiet or not main)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr, args.warmup_lr, args.min_lr)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                if mixup is not None:
                    images, targets = mixup(images, labels)
                    logits = forward(images).float()
                    loss = soft_loss(logits, targets)
                else:
                    logits = forward(images).float()
                    loss = F.cross_entropy(logits, labels, label_smoothing=args.smoothing)
            if args.method == "tcpa":
                loss = loss + args.match_weight * tk.get_matching_loss(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)  # clip the true gradients (fp16: scaled until here)
                CLIP[args.clip_mode](params, args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            sums = [sums[0] + loss.item() * len(labels), sums[1] + (logits.argmax(-1) == labels).sum().item(),
                    sums[2] + len(labels)]
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}")
            if step == eta_step and main and not args.quiet:
                bar.write(eta_line(time.perf_counter() - start, step - epoch * len(train_loader), len(train_loader),
                                   args.epochs - epoch))
        epoch_s = time.perf_counter() - start
        loss_sum, correct, seen = all_sum(sums, world, device)
        val_loss, val_acc = evaluate(model, eval_loader, device, amp, args.method, world)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "val_loss": val_loss, "val_acc": val_acc, "epoch_s": epoch_s,
                        "peak_memory_mb": peak_memory_mb(device)})
        improved = val_acc > progress["best_acc"]
        progress = {"epoch": epoch + 1, "step": step, "best_acc": max(val_acc, progress["best_acc"]),
                    "best_epoch": epoch + 1 if improved else progress["best_epoch"], "history": history}
        if main:
            meta = {"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss, "classes": classes,
                    "data_config": data_config, "batch_per_process": per_process, "args": record(args)}
            state = {"progress": progress, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "rng": rng_state()}
            writers = {LAST: partial(write_checkpoint, model, method=args.method, meta=meta),
                       STATE: partial(torch.save, state)}
            if improved:
                writers[BEST] = writers[LAST]
            save_epoch(out, writers)
            write_logs(summarize(args, history, progress, params, device), out)
            if not args.quiet:
                print(epoch_line(history[-1], args.epochs, optimizer.param_groups[0]["lr"]))
    summary = summarize(args, history, progress, params, device)
    if main:
        plot_curves(summary, out)
        if not args.quiet:
            print(final_line(summary, progress, time.perf_counter() - run_start, out))
    return summary


ETA_STEPS = 3  # the estimate of the run's length is printed after this many steps (or the first epoch, if shorter)


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '2.1 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def eta_line(elapsed: float, steps: int, steps_per_epoch: int, epochs_left: int) -> str:
    """The estimate printed once after the first steps: training time per epoch and for the epochs left (without
    validation)."""
    per_epoch = elapsed / max(1, steps) * steps_per_epoch
    return (f"{PROG}: about {duration(per_epoch)} per epoch, {duration(per_epoch * epochs_left)} in all "
            f"({epochs_left} epoch{'s' * (epochs_left != 1)}, training only; from the first {steps} "
            f"step{'s' * (steps != 1)})")


def epoch_line(h: dict, epochs: int, lr: float) -> str:
    """One readable line per epoch (log.csv / log.json hold every value)."""
    return (f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.3f}  val loss {h['val_loss']:.3f}  "
            f"val acc {100 * h['val_acc']:.1f} %  lr {lr:.1e}  {duration(h['epoch_s'])}")


def final_line(summary: dict, progress: dict, seconds: float, out: Path) -> str:
    """The end of a run: the best validation accuracy and its epoch, the time, where the files are."""
    files = [name for name in (BEST, LAST, STATE, "log.csv", "log.json", "curves.png") if (out / name).exists()]
    return (f"{PROG}: done: best val acc {100 * summary['best_val_acc']:.1f} % at epoch {summary['best_epoch']} of "
            f"{progress['epoch']} (last {100 * summary['val_acc']:.1f} %), {duration(seconds)}; files in {out}: "
            f"{', '.join(files)}")


def default_batch_size(train_images: int, world: int, mixing: bool) -> int:
    """DEFAULT_BATCH_SIZE, at most the training images, a multiple of the processes (of twice that with mixup)."""
    step = world * (2 if mixing else 1)
    size = min(DEFAULT_BATCH_SIZE, train_images) // step * step
    if size == 0:
        fail(f"--batch-size: the default ({DEFAULT_BATCH_SIZE}, at most the training images) needs at least {step} "
             f"training images, got {train_images}")
    return size


def banner(args, train_images: int, val_images: int, classes: int, params, device, out) -> str:
    """The start banner: what trains on what, where, with which derived defaults."""
    notes = getattr(args, "_defaults", {})
    derived = ", ".join(f"{option(k)} {getattr(args, k)} ({why})" for k, why in notes.items())
    return (f"{PROG}: {args.model} {args.img_size} px, {args.method}, {sum(p.numel() for p in params):,} trainable "
            f"parameters; {train_images} training / {val_images} validation images, {classes} classes; "
            f"batch {args.batch_size}, {args.epochs} epoch{'s' * (args.epochs != 1)}; device {device}; writing to {out}"
            + (f"\n{PROG}: defaults: {derived}" if derived else ""))


def summarize(args, history, progress, params, device) -> dict:
    return {"method": args.method, "val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"],
            "best_val_acc": progress["best_acc"], "best_epoch": progress["best_epoch"],
            "epoch_s_mean": sum(h["epoch_s"] for h in history) / len(history),
            "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
            "memory_metric": "cuda_peak_allocated" if device.type == "cuda" else "process_peak_rss",
            "trainable_parameters": sum(p.numel() for p in params), "history": history, "args": record(args)}


def write_logs(summary: dict, out: Path) -> None:
    """log.json (the summary) and log.csv (one row an epoch)."""
    (out / "log.json").write_text(json.dumps(summary, indent=2))
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary["history"][0]))
        writer.writeheader()
        writer.writerows(summary["history"])


def plot_curves(summary: dict, out: Path) -> None:
    """curves.png: loss and accuracy per epoch (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = curves_figure(summary, plt)
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def curves_figure(summary: dict, plt):
    """The figure of curves.png: loss and accuracy per epoch, on integer epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    history = summary["history"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_acc", "val_acc"):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{summary['method']}: {title}")
        ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(args)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            last = Path(args.out) / LAST if not args.eval_only else None
            where = (f"the last complete checkpoint is {last}; continue with the same options and --resume "
                     f"{args.out}" if last is not None and last.exists() else "no checkpoint written")
            print(f"{PROG}: interrupted: {where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
