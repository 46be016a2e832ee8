"""Profiling CLI: train-step time, inference time and training memory of TCPA (fused) against the no-prompt
model, VPT-deep and the published dense-mask TCPA, side by side, plus a scaling sweep; prints a table, writes JSON
and a PNG.

    python -m tcpa_kernels.profile                # default small setting (a minute on CPU)
    python -m tcpa_kernels.profile --model vit_base_patch16_224 --img-size 224 --batch-size 128 --dtype bf16
    tcpa-profile --help

Defaults depend on the device: CPU runs vit_tiny at 64 px, batch 8, on one thread (a smoke setting: the CPU path
is the PyTorch backend, not the kernels; one thread, because torch's threads stall one another on a busy machine);
CUDA runs ViT-B/16 at 224 px, batch 128, bf16 autocast (docs/how-it-works.md, 'Targets').

Every time is the median of --reps rounds (default 7 on CPU, 10 on CUDA); round r times every method once, in an
order rotated by r, so that a burst of load on the machine lands on all methods, not on one. The table and the JSON
give each median with its spread: min-max and the interquartile range (IQR). A figure whose IQR is over 10 % of its
median is named in a warning (the IQR rather than max-min, because one stray sample, which the median ignores,
should not flag a figure); the PNG's error bars are min-max. Ratios are fused TCPA's figure / the other method's,
as docs/how-it-works.md, 'Targets' states its targets: below 1, fused TCPA is faster (smaller). A time ratio is the
median over the rounds of that round's ratio, with its spread.
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
from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import MAX_POOL_ENTRIES

OUTPUTS = ("profile.json", "profile.png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_DEFAULTS = dict(model="vit_tiny_patch16_224", img_size=64, batch_size=8, dtype="fp32", reps=7, threads=1,
                    sweep_batch=[2, 4, 8], sweep_pool=[4, 9, 18], sweep_img=[32, 64])
CUDA_DEFAULTS = dict(model="vit_base_patch16_224", img_size=224, batch_size=128, dtype="bf16", reps=10, threads=0,
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
    parser.add_argument("--reps", type=int, help="timed rounds: every method once per round, in rotating order; a "
                                                 "figure is their median (default 7 on CPU, 10 on CUDA)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of torch while measuring; 0: torch's default (default 1 on CPU: on a shared "
                             "machine torch's threads stall one another, and a step varies 40x; 0 on CUDA)")
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
                 sweep_pool=pool, img_size=image, sweep_img=image, threads=(lambda v: v >= 0, "an int >= 0"))
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


TIMES = {"train_ms": "train step time (ms)", "inference_ms": "inference time (ms)"}
MEMORY_LABELS = {"cpu_saved_for_backward_mb": "saved for backward (MB)",
                 "cuda_peak_allocated_mb": "train step peak memory (MB)"}
SWEEP_LABELS = {"batch_size": "batch size", "pool_size": "pool size (entries per pool)", "img_size": "image size (px)"}
COLORS = {method: f"C{i}" for i, method in enumerate(bench.MODEL_METHODS)}  # a method's colour in every panel
RATIO_MEANING = ("fused/this = fused TCPA's figure / this method's (as the targets read): below 1, "
                 "fused TCPA is faster (smaller)")


def run(args: argparse.Namespace) -> dict:
    """All measurements; returns the result dict written to profile.json."""
    from tqdm import tqdm

    device = torch.device(args.device)
    base = dict(model_name=args.model, img_size=args.img_size, batch_size=args.batch_size, pool_size=args.pool_size,
                topk=args.topk, dtype=DTYPES[args.dtype], device=device, reps=args.reps)
    settings = [("main", None)] + [(axis, value) for axis, values in (
        ("batch_size", args.sweep_batch), ("pool_size", args.sweep_pool), ("img_size", args.sweep_img))
        for value in values]
    results = {"main": {}, "sweep": []}
    for axis, value in tqdm(settings, desc="profiling", unit="setting"):
        setting = base | ({} if axis == "main" else {axis: value})
        setting["topk"] = min(args.topk, setting["pool_size"])  # the pool sweep goes below top-k
        figures = bench.measure_models(args.methods, **setting)
        if axis == "main":
            results["main"] = figures
        else:
            results["sweep"] += [{"axis": axis, "value": value, "method": m, **f} for m, f in figures.items()]
    result = {"environment": bench.environment(device), "memory_metric": bench.memory_metric(device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}
              | {"backend": resolve_backend("auto", device)},
              "spread": {"warned_above": f"iqr_rel = (q3 - q1) / median > {bench.SPREAD_LIMIT}",
                         "error_bars": "min-max", "quartiles": "statistics.quantiles(method='inclusive')"},
              "ratio": RATIO_MEANING, **results, "ratios": ratios(results["main"])}
    result["warnings"] = spread_warnings(result)
    return result


def ratios(main: dict) -> dict:
    """fused / other per method (docs/how-it-works.md, 'Targets' reads them this way): each time ratio summarized over
    the rounds, the memory ratio."""
    fused = main.get("tcpa_fused")
    if not fused or fused["train_ms"] is None:
        return {}

    def per_round(key: str, other: dict) -> dict:  # round r's fused time / round r's other time: timed together
        return bench.summarize([bench.ratio(a, b) for a, b in zip(fused[key]["samples"], other[key]["samples"])])

    return {other: {key: per_round(key, figures) for key in TIMES}
            | {"train_memory_mb": bench.ratio(fused["train_memory_mb"], figures["train_memory_mb"])}
            for other, figures in main.items() if other != "tcpa_fused" and figures["train_ms"] is not None}


def spread_warnings(result: dict) -> list[str]:
    """A line per time of the main comparison whose IQR is over bench.SPREAD_LIMIT of its median; one for the sweep."""
    limit = f"{bench.SPREAD_LIMIT:.0%}"
    lines = [f"{method} {label}: IQR {figures[key]['iqr_rel']:.0%} of the median, over {limit}"
             for method, figures in result["main"].items() for key, label in TIMES.items()
             if figures[key] is not None and bench.noisy(figures[key])]
    sweep = [row[key] for row in result["sweep"] for key in TIMES if row[key] is not None]
    if any(map(bench.noisy, sweep)):
        lines.append(f"{sum(map(bench.noisy, sweep))} of {len(sweep)} sweep times: IQR over {limit} of the median "
                     f"(profile.json)")
    if lines:
        lines.append("a busy machine or too few rounds: close other work or raise --reps (on a shared CPU keep "
                     "--threads 1), and read a ratio only within its spread")
    return lines


def describe(result: dict) -> str:
    """The setting in one line: model, image size, batch, dtype, device (and its threads, if set), backend."""
    s = result["settings"]
    threads = f", {s['threads']} thread{'s' * (s['threads'] > 1)}" if s["threads"] else ""
    return (f"{s['model']}, {s['img_size']} px, batch {s['batch_size']}, {s['dtype']}, "
            f"{result['environment']['device']}{threads}, backend {s['backend']}")


def spread_cell(figure: dict | None, digits: int = 2) -> str:
    """'median [min-max] IQR%' of a ``bench.summarize`` result; OOM for a method that ran out of memory."""
    if figure is None:
        return "OOM"
    return (f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}] "
            f"{figure['iqr_rel']:.0%}")


def format_table(result: dict) -> str:
    """The console report: figures, ratios with their meaning, warnings."""
    env, memory = result["environment"], MEMORY_LABELS[result["memory_metric"]]
    lines = [f"{describe(result)}; torch {env['torch']}, triton {env['triton']}",
             f"times: median of {result['settings']['reps']} interleaved rounds [min-max] IQR as % of the median",
             f"{'method':<12} {TIMES['train_ms']:<30} {TIMES['inference_ms']:<30} {memory}"]
    for method, f in result["main"].items():
        mb = "OOM" if f["train_memory_mb"] is None else f"{f['train_memory_mb']:.2f}"
        lines.append(f"{method:<12} {spread_cell(f['train_ms']):<30} {spread_cell(f['inference_ms']):<30} {mb}")
    if result["ratios"]:
        lines += ["", RATIO_MEANING,
                  f"{'fused/this':<12} {'train step time':<30} {'inference time':<30} {'memory'}"]
        for method, r in result["ratios"].items():
            lines.append(f"{method:<12} {spread_cell(r['train_ms'], 3):<30} {spread_cell(r['inference_ms'], 3):<30} "
                         f"{r['train_memory_mb']:.3f}")
    lines += [f"warning: {line}" for line in result["warnings"]]
    return "\n".join(lines)


def _median_and_error(figure: dict | float | None) -> tuple[float, list[float]]:
    """Height and [below, above] error bar of a figure: its median and min-max, or a single value (memory)."""
    if isinstance(figure, dict):
        return figure["median"], [figure["median"] - figure["min"], figure["max"] - figure["median"]]
    return figure or 0.0, [0.0, 0.0]


def build_figure(result: dict):
    """The PNG as a matplotlib Figure: bars with min-max error bars of train step time, inference time and memory
    per method, then a train-step-time panel per sweep axis; one colour per method throughout, the setting in the
    title."""
    from matplotlib.figure import Figure

    methods = list(result["main"])
    sweeps = [axis for axis in SWEEP_LABELS if any(row["axis"] == axis for row in result["sweep"])]
    fig = Figure(figsize=(15, 4.5 * (1 + bool(sweeps))), layout="constrained")
    axes = list(fig.subplots(1 + bool(sweeps), 3, squeeze=False).flat)
    for ax, key, title in zip(axes, [*TIMES, "train_memory_mb"], [*TIMES.values(),
                                                                    MEMORY_LABELS[result["memory_metric"]]]):
        heights, errors = zip(*(_median_and_error(result["main"][m][key]) for m in methods))
        ax.bar(methods, heights, yerr=list(zip(*errors)) if key in TIMES else None, capsize=4,
               color=[COLORS[m] for m in methods])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    for ax, axis in zip(axes[3:], sweeps):
        for method in methods:
            rows = [r for r in result["sweep"] if r["axis"] == axis and r["method"] == method and r["train_ms"]]
            heights, errors = zip(*(_median_and_error(r["train_ms"]) for r in rows)) if rows else ((), ())
            ax.errorbar([r["value"] for r in rows], heights, yerr=list(zip(*errors)) or None, marker="o",
                        capsize=3, color=COLORS[method], label=method)
        ax.set_title(f"{TIMES['train_ms']} vs {SWEEP_LABELS[axis]}")
        ax.set_xlabel(SWEEP_LABELS[axis])
        ax.legend(fontsize="small")
    for ax in axes[3 + len(sweeps):]:
        ax.set_visible(False)
    s = result["settings"]
    fig.suptitle(f"{describe(result)}\nmedian of {s['reps']} interleaved rounds, error bars min-max; pools of "
                 f"{s['pool_size']} entries, top-{s['topk']}")
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    json_path, png_path = (Path(args.out) / name for name in OUTPUTS)  # the folder exists: check_args made it
    json_path.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    try:
        build_figure(result).savefig(png_path, dpi=100)
        print(f"wrote {json_path} and {png_path}")
    except ImportError:
        print(f"wrote {json_path} (install matplotlib for the plot: pip install -e '.[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
