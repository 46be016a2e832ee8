"""Eager vs CUDA graphs for one ViT train step and one eval forward: is the eager step host-bound?

    python benchmarks/graphs.py [--batches 32,64,128] [--methods no_prompts,vpt_deep,tcpa_fused] [--out DIR]

On CUDA: ViT-B/16 (timm ``vit_base_patch16_224``, no weights), 224 px, bf16 autocast, pools 18+18 top-10 (VPT-deep:
36 prompts), per method and batch size: the train step (forward, cross entropy + 0.01 x matching loss, backward,
AdamW step) and the eval forward, eager and with the model compiled by ``torch.compile(mode="reduce-overhead")``
(CUDA graphs: the host launches one graph instead of every kernel). Median ms per step (``bench.time_ms``); the
ratio eager / graphs says how much of the eager step is host time the GPU waits on. The JSON (device, versions,
every figure) is rewritten after every figure to ``<out>/<device>-graphs.json``.

Without CUDA it runs a smoke configuration (vit_tiny at 32 px, batch 2, fp32, dynamo without a backend compiler),
so that CI checks the script; those are not GPU figures and are not written.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli import at_least, method_list  # noqa: E402
from tcpa_kernels import bench  # noqa: E402

METHODS = ("no_prompts", "vpt_deep", "tcpa_fused")
SPEC = dict(model_name="vit_base_patch16_224", img_size=224, pool_size=18, topk=10, dtype=torch.bfloat16)
SMOKE = dict(model_name="vit_tiny_patch16_224", img_size=32, pool_size=4, topk=2, dtype=torch.float32)


def measure(method: str, batch: int, compiled: bool, device: torch.device, setting: dict, reps: int) -> dict:
    """Train-step and eval-forward ms of one method, eager or compiled (CUDA graphs on CUDA)."""
    model = bench.build_model(method, model_name=setting["model_name"], img_size=setting["img_size"],
                              pool_size=setting["pool_size"], topk=setting["topk"], device=device)
    if compiled:
        options = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="eager")
        model = torch.compile(model, **options)
    images = torch.randn(batch, 3, setting["img_size"], setting["img_size"], device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    train = bench.train_step(model, images, labels, setting["dtype"])
    train()  # compilation, graph capture and the optimizer state stay out of the figures
    result = {"train_ms": bench.time_ms(train, device, reps)}
    result["eval_ms"] = bench.time_ms(bench.inference_step(model, images, setting["dtype"]), device, reps)
    return result


def run(batches, methods, device, out: Path | None, reps: int = 10) -> dict:
    setting = SPEC if device.type == "cuda" else SMOKE
    report = {"environment": bench.environment(device), "setting": {**setting, "dtype": str(setting["dtype"])},
              "figures": {}}
    path = None if out is None else out / f"{bench.device_slug(device)}-graphs.json"
    for batch in batches:
        for method in methods:
            figures = {mode: measure(method, batch, mode == "graphs", device, setting, reps)
                       for mode in ("eager", "graphs")}
            figures["eager_over_graphs"] = {k: figures["eager"][k] / figures["graphs"][k] for k in figures["eager"]}
            report["figures"][f"b{batch}/{method}"] = figures
            print(f"batch {batch:4d} {method:11s} train eager {figures['eager']['train_ms']:8.2f} ms, graphs "
                  f"{figures['graphs']['train_ms']:8.2f} ms; eval eager {figures['eager']['eval_ms']:8.2f} ms, "
                  f"graphs {figures['graphs']['eval_ms']:8.2f} ms", flush=True)
            if path is not None:
                path.write_text(json.dumps(report, indent=1))
            torch._dynamo.reset()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default=None, help="comma-separated (default: 32,64,128 on CUDA, 2 on CPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder of the JSON (CUDA)")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    device = bench.default_device()
    methods = method_list(parser, args.methods, METHODS)
    at_least(parser, args, 1, "reps")
    batches = args.batches or ("32,64,128" if device.type == "cuda" else "2")
    try:
        batches = [int(b) for b in batches.split(",")]
    except ValueError:
        parser.error(f"--batches: expected comma-separated integers, got {batches!r}")
    if device.type == "cuda":
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        print("no CUDA device: smoke configuration (vit_tiny, 32 px, fp32, dynamo only); not GPU figures, not written")
    run(batches, methods, device, args.out if device.type == "cuda" else None, args.reps)


if __name__ == "__main__":
    main()
