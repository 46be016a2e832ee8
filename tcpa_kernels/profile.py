"""Profiling CLI: train-step time and memory of TCPA (fused) against the no-prompt model, VPT-deep and the
published dense-mask TCPA, side by side, plus a scaling sweep; prints a table, writes JSON and a PNG.

    python -m tcpa_kernels.profile                # default small setting (a minute on CPU)
    python -m tcpa_kernels.profile --model vit_base_patch16_224 --img-size 224 --batch-size 128 --dtype bf16
    tcpa-profile --help

Defaults depend on the device: CPU runs vit_tiny at 64 px, batch 8 (a smoke setting: the CPU path is the
PyTorch backend, not the kernels); CUDA runs ViT-B/16 at 224 px, batch 128, bf16 autocast (TCPA_SPEC.md §6).
"""

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from tcpa_kernels import bench
from tcpa_kernels._validate import MAX_POOL_ENTRIES

OUTPUTS = ("profile.json", "profile.png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_DEFAULTS = dict(model="vit_tiny_patch16_224", img_size=64, batch_size=8, dtype="fp32", reps=3,
                    sweep_batch=[2, 4, 8], sweep_pool=[4, 9, 18], sweep_img=[32, 64])
CUDA_DEFAULTS = dict(model="vit_base_patch16_224", img_size=224, batch_size=128, dtype="bf16", reps=10,
                     sweep_batch=[32, 64, 128, 256], sweep_pool=[9, 18, 32], sweep_img=[224, 384])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tcpa-profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda if available)")
    parser.add_argument("--model", help="timm ViT name (default: vit_tiny_patch16_224 on CPU, "
                                        "vit_base_patch16_224 on CUDA)")
    parser.add_argument("--img-size", type=int, help="image size in pixels")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--pool-size", type=int, default=18,
                        help="entries per TCPA pool; VPT-deep gets 2x this many prompts (default 18)")
    parser.add_argument("--topk", type=int, default=10, help="entries each token selects (default 10)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement")
    parser.add_argument("--methods", nargs="+", choices=bench.MODEL_METHODS,
                        help="default: all that the model can run (tcpa_dense, the published dense-mask "
                             "implementation, exists for timm's pre-norm Block only)")
    parser.add_argument("--sweep-batch", type=int, nargs="*", help="batch sizes of the scaling sweep")
    parser.add_argument("--sweep-pool", type=int, nargs="*",
                        help="pool sizes of the scaling sweep (top-k is clamped to the pool size)")
    parser.add_argument("--sweep-img", type=int, nargs="*", help="image sizes of the scaling sweep")
    parser.add_argument("--no-sweep", action="store_true", help="only the main comparison")
    parser.add_argument("--out", default="runs/profile", help="folder for profile.json and profile.png")
    args = parser.parse_args(argv)
    check_args(args, parser.error)
    return args


def check_args(args, error):
    """Fill in the device's defaults and check every option before any measurement: ``error`` (argparse's: exit 2)
    names the option and the value received. Creates the output folder."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        error(f"--device: expected auto, cpu or cuda (with a GPU present), got {args.device!r}")
    for key, value in (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import timm

    if not timm.is_model(args.model):
        error(f"--model: expected a timm model name (see timm.list_models('vit*')), got {args.model!r}")
    try:
        runnable = bench.model_methods(args.model)
    except TypeError as problem:
        error(f"--model: {args.model} cannot be prompted ({problem})")
    if args.methods is None:
        args.methods = list(runnable)
    elif set(args.methods) - set(runnable):
        error(f"--methods: {args.model} runs {', '.join(runnable)}, got {' '.join(args.methods)}")
    if args.no_sweep:
        args.sweep_batch = args.sweep_pool = args.sweep_img = []

    with torch.device("meta"):  # pixels per token side: the patch size (times the CNN stride of a hybrid ViT)
        patch = math.lcm(*timm.create_model(args.model).patch_embed.feat_ratio(as_scalar=False))
    positive = (lambda v: v >= 1, "a positive int")
    most = MAX_POOL_ENTRIES // 2
    pool = ((lambda v: 1 <= v <= most, f"an int in [1, {most}] (TCPA's two pools share {MAX_POOL_ENTRIES} entries)")
            if any(method.startswith("tcpa") for method in args.methods) else positive)
    image = (lambda v: v >= 1 and v % patch == 0, f"a positive multiple of {args.model}'s patch size ({patch} px)")
    rules = dict(batch_size=positive, sweep_batch=positive, reps=positive, topk=positive, pool_size=pool,
                 sweep_pool=pool, img_size=image, sweep_img=image)
    for name, (valid, expected) in rules.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if not valid(v):
                error(f"--{name.replace('_', '-')}: expected {expected}, got {v}")
    if args.topk > args.pool_size:  # the pool sweep clamps top-k to each pool size
        error(f"--topk: expected 1 <= topk <= --pool-size ({args.pool_size}), got {args.topk}")

    with warnings.catch_warnings():  # autocast warns and disables itself for a dtype the device lacks
        warnings.simplefilter("error", UserWarning)
        try:
            bench._autocast(torch.device(args.device), DTYPES[args.dtype])
        except (RuntimeError, UserWarning) as problem:
            error(f"--dtype: expected a dtype that {args.device} autocast supports, got {args.dtype} "
                  f"({' '.join(str(problem).split())})")

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as problem:
        error(f"--out: expected a writable folder, got {args.out!r} ({problem})")
    taken = [name for name in OUTPUTS if (out / name).is_dir()]
    if taken:
        error(f"--out: expected {' and '.join(OUTPUTS)} to be files, got a folder {out / taken[0]}")


def run(args):
    """All measurements; returns the result dict written to profile.json."""
    from tqdm import tqdm

    device = torch.device(args.device)
    base = dict(model_name=args.model, img_size=args.img_size, batch_size=args.batch_size, pool_size=args.pool_size,
                topk=args.topk, dtype=DTYPES[args.dtype], device=device, reps=args.reps)
    jobs = [("main", None, method) for method in args.methods]
    for axis, values in (("batch_size", args.sweep_batch), ("pool_size", args.sweep_pool),
                         ("img_size", args.sweep_img)):
        jobs += [(axis, value, method) for value in values for method in args.methods]
    results = {"main": {}, "sweep": []}
    for axis, value, method in tqdm(jobs, desc="profiling", unit="run"):
        setting = base if axis == "main" else base | {axis: value}
        setting["topk"] = min(args.topk, setting["pool_size"])  # the pool sweep goes below top-k
        try:
            figures = bench.measure_model(method, **setting)
        except torch.OutOfMemoryError:
            figures = {"train_ms": None, "train_memory_mb": None, "inference_ms": None, "error": "out of memory"}
            torch.cuda.empty_cache()
        if axis == "main":
            results["main"][method] = figures
        else:
            results["sweep"].append({"axis": axis, "value": value, "method": method, **figures})
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    return {"environment": bench.environment(device), "memory_metric": bench.memory_metric(device),
            "settings": settings, **results, "ratios": ratios(results["main"])}


def ratios(main):
    """tcpa_fused / other, for time and memory (TCPA_SPEC.md §6 reads them this way)."""
    fused = main.get("tcpa_fused")
    if not fused or fused["train_ms"] is None:
        return {}
    return {other: {key: bench.ratio(fused[key], figures[key]) for key in ("train_ms", "train_memory_mb")}
            for other, figures in main.items() if other != "tcpa_fused" and figures["train_ms"] is not None}


def format_table(result):
    metric = result["memory_metric"]
    lines = [f"device: {result['environment']['device']}  torch {result['environment']['torch']}  "
             f"triton {result['environment']['triton']}",
             f"{'method':<12} {'train ms':>10} {'memory MB':>10} {'infer ms':>10} {'fused/this time':>16} "
             f"{'fused/this mem':>15}"]
    for method, f in result["main"].items():
        r = result["ratios"].get(method, {})
        cells = [f"{f[k]:10.2f}" if f[k] is not None else f"{'OOM':>10}" for k in
                 ("train_ms", "train_memory_mb", "inference_ms")]
        time_ratio = f"{r['train_ms']:16.3f}" if r else f"{'':>16}"
        mem_ratio = f"{r['train_memory_mb']:15.3f}" if r else f"{'':>15}"
        lines.append(f"{method:<12} {' '.join(cells)} {time_ratio} {mem_ratio}")
    lines.append(f"memory = {metric}")
    return "\n".join(lines)


def plot(result, path):
    """Bars of time and memory per method, and one panel per sweep axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = sorted({row["axis"] for row in result["sweep"]})
    fig, axes = plt.subplots(1, 2 + len(axes_names), figsize=(5 * (2 + len(axes_names)), 4), squeeze=False)
    methods = list(result["main"])
    for ax, key, label in ((axes[0][0], "train_ms", "train step (ms)"),
                           (axes[0][1], "train_memory_mb", result["memory_metric"])):
        ax.bar(methods, [result["main"][m][key] or 0 for m in methods], color=["C0", "C1", "C2", "C3"][:len(methods)])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    for ax, axis in zip(axes[0][2:], axes_names):
        for method in methods:
            rows = [r for r in result["sweep"] if r["axis"] == axis and r["method"] == method and r["train_ms"]]
            ax.plot([r["value"] for r in rows], [r["train_ms"] for r in rows], marker="o", label=method)
        ax.set_xlabel(axis)
        ax.set_ylabel("train step (ms)")
        ax.legend()
    fig.suptitle(f"{result['settings']['model']} on {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    json_path, png_path = (Path(args.out) / name for name in OUTPUTS)  # the folder exists: check_args made it
    json_path.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    try:
        plot(result, png_path)
        print(f"wrote {json_path} and {png_path}")
    except ImportError:
        print(f"wrote {json_path} (install matplotlib for the plot: pip install -e '.[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
