"""Op census of one ViT train step: a compute-free proxy for GPU cost (TCPA_SPEC.md §6).

    python benchmarks/census.py                      # ViT-B/16, batch 128, 224 px, bf16 autocast, on CPU
    python -m benchmarks.census --methods no_prompts,vpt_deep,tcpa_fused,tcpa_dense --top 10 --json census.json

One train step (forward, cross entropy + 0.01 * matching loss for TCPA, backward; no optimizer step) runs under
``FakeTensorMode``, so no kernel executes and real batch sizes cost seconds; a ``TorchDispatchMode`` above it
records every op that reaches the dispatcher. An uncounted forward before it fills what the model caches between
steps (a steady-state step, not the first). Per method and phase (forward = up to the loss, backward =
``loss.backward()``) it reports:

- ops: every aten op and every custom op (``tcpa_kernels::...`` wraps exactly one kernel launch and counts as
  one), a proxy for kernel launches. Not counted, because they launch nothing: views and metadata ops, i.e.
  ops whose schema returns an alias of an input without writing it (view, t, transpose, permute, expand,
  unsqueeze, squeeze, slice, select, unbind, split, chunk, unflatten, narrow, alias, as_strided, detach,
  lift_fresh, _reshape_alias, view_as_real/complex, conj, movedim, diagonal, ...), the in-place metadata ops
  (t_, unsqueeze_, ...), ``_unsafe_view`` (a view whose schema does not say so), the queries ``is_same_size``,
  ``promote_types`` and ``prim::*`` (``prim::device``: fake tensors answer ``.device`` through the dispatcher),
  and the allocations without a kernel (empty, empty_like, empty_strided, new_empty, new_empty_strided).
  Everything else counts, dtype casts (``_to_copy``), copies and fills (zeros, ones_like) included; composite
  ops (linear, matmul, reshape, ...) are seen as what they decompose into, as on a GPU.
- bytes in + out: numel * element_size of every tensor argument and result of a counted op, a proxy for HBM
  traffic (GEMM operand reads included; an in-place op's tensor counts as read and written; a broadcast
  input counts at its broadcast size and a ``*_like`` factory's template as read, which overstates a little).
- bytes saved for backward: the storages the autograd graph keeps (``saved_tensors_hooks``), each once,
  counting only storages allocated during the step (parameters, buffers and inputs are left out).

Caveats: on CPU the census follows CPU autocast, whose cast rules differ a little from CUDA's (``--device cuda``
takes CUDA's, with a GPU); a custom op counts as one launch whatever its kernel does; the figures count work
and traffic, not time (a fused kernel and an elementwise op weigh the same as ops).
"""

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (first: backend="triton" on CPU fake tensors needs the interpreter)
import tcpa_kernels as tk  # noqa: E402
from tcpa_kernels import bench  # noqa: E402

METHODS = bench.MODEL_METHODS
DEFAULT_METHODS = ("no_prompts", "vpt_deep", "tcpa_fused")
PHASES = ("forward", "backward")
aten = torch.ops.aten
NOT_KERNELS = {aten._unsafe_view, aten.is_same_size, aten.promote_types, aten.empty, aten.empty_like,
               aten.empty_strided, aten.new_empty, aten.new_empty_strided}


def is_counted(func: torch._ops.OpOverload) -> bool:
    """Whether an op launches a kernel: everything but views, metadata ops and bare allocations."""
    return not (func.namespace == "prim" or func.is_view or torch.Tag.inplace_view in func.tags
                or func.overloadpacket in NOT_KERNELS)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage's identity (fake storages have no data pointer)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class OpCensus(TorchDispatchMode):
    """Counts and bytes in + out of the counted ops per (phase, op name), and the storages ops allocate."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = PHASES[0]
        self.counts: Counter = Counter()
        self.bytes: Counter = Counter()
        self.allocated: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.allocated.update({_storage(t) for t in outputs} - {_storage(t) for t in inputs})
        if is_counted(func):
            key = (self.phase, func.name().removesuffix(".default"))
            self.counts[key] += 1
            self.bytes[key] += _nbytes(inputs) + _nbytes(outputs)
        return out


def _to_fake(model: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer by a fake tensor of the same shape, dtype, device and requires_grad."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)


def count_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
               loss_fn: Callable[..., torch.Tensor]) -> dict:
    """The census of ``loss_fn(model, *inputs)`` (forward) and its ``backward()``, without compute.

    One uncounted forward runs first, so that what a model caches between steps is cached, as in a training
    loop after its first step. The model's parameters and buffers are replaced by fake tensors in place (the
    model is spent afterwards).
    Returns ``{"ops": {phase: n}, "bytes": {phase: n}, "saved_bytes": n, "per_op": [{"op", "phase", "count",
    "bytes"}, ...]}``, per_op sorted by bytes, largest first.
    """
    mode = FakeTensorMode()
    _to_fake(model, mode)
    inputs = tuple(mode.from_tensor(t) for t in inputs)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[_storage(t)] = t.untyped_storage().nbytes()
        return t

    with mode:
        loss_fn(model, *inputs)
    recorder = OpCensus()
    with mode, recorder:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, *inputs)
        recorder.phase = "backward"
        loss.backward()
    per_op = [{"op": op, "phase": phase, "count": n, "bytes": recorder.bytes[phase, op]}
              for (phase, op), n in recorder.counts.items()]
    return {"ops": {phase: sum(r["count"] for r in per_op if r["phase"] == phase) for phase in PHASES},
            "bytes": {phase: sum(r["bytes"] for r in per_op if r["phase"] == phase) for phase in PHASES},
            "saved_bytes": sum(n for key, n in saved.items() if key in recorder.allocated),
            "per_op": sorted(per_op, key=lambda r: (-r["bytes"], r["phase"], r["op"]))}


def census(method: str, model_name: str = "vit_base_patch16_224", batch: int = 128, img: int = 224, *,
           pool_size: int = 18, topk: int = 10, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The census (``count_step``'s dict plus ``"method"``) of one train step of ``method`` (one of ``METHODS``),
    built as the profiler builds it, in train mode: cross entropy (+ 0.01 * matching loss for TCPA) under
    autocast to ``dtype``, then backward."""
    model = bench.build_model(method, model_name=model_name, img_size=img, pool_size=pool_size, topk=topk,
                              device=torch.device(device), backend="triton").train()
    images = torch.randn(batch, 3, img, img, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)

    def loss_fn(model, images, labels):
        with torch.autocast(device, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            return loss + 0.01 * tk.get_matching_loss(model) if method.startswith("tcpa") else loss

    return {"method": method, **count_step(model, (images, labels), loss_fn)}


def ratios(result: dict, base: dict) -> dict:
    """Ops (forward + backward), bytes in + out (forward + backward) and saved bytes of result over base."""
    def ratio(key):
        return sum(result[key].values()) / sum(base[key].values())

    return {"ops": ratio("ops"), "bytes": ratio("bytes"), "saved_bytes": result["saved_bytes"] / base["saved_bytes"]}


def growth(result: dict, base: dict, top: int) -> list[dict]:
    """The ops whose count or bytes grew most over base (the union of the top ``top`` by each, growth > 0 only),
    largest +bytes first."""
    now, before = ({(row["phase"], row["op"]): row for row in r["per_op"]} for r in (result, base))
    zero = {"count": 0, "bytes": 0}
    delta = [{"op": op, "phase": phase, **{k: now.get((phase, op), zero)[k] - before.get((phase, op), zero)[k]
                                           for k in ("count", "bytes")}}
             for phase, op in sorted(now.keys() | before.keys())]
    picked = {(r["phase"], r["op"]): r for key in ("count", "bytes")
              for r in sorted((r for r in delta if r[key] > 0), key=lambda r: -r[key])[:top]}
    return sorted(picked.values(), key=lambda r: (-r["bytes"], -r["count"]))


def format_report(results: dict, top: int) -> str:
    """The markdown table of all methods against no_prompts, then each prompted method's largest growth."""
    base = results.get("no_prompts")
    lines = ["| method | ops fwd / bwd | ops vs no-prompts | GB in+out fwd / bwd | traffic vs no-prompts "
             "| MB saved for backward | saved vs no-prompts |", "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        rel = ratios(r, base) if base else {}
        show = {key: f"{rel[key]:.3f}x" if rel else "-" for key in ("ops", "bytes", "saved_bytes")}
        lines.append(f"| {method} | {r['ops']['forward']} / {r['ops']['backward']} | {show['ops']} | "
                     f"{r['bytes']['forward'] / 1e9:.1f} / {r['bytes']['backward'] / 1e9:.1f} | {show['bytes']} | "
                     f"{r['saved_bytes'] / 2**20:.0f} | {show['saved_bytes']} |")
    for method, r in results.items():
        if not base or method == "no_prompts" or top == 0:
            continue
        lines += ["", f"{method}: ops that grew most over no_prompts", "", "| op | phase | +count | +GB |",
                  "|---|---|---|---|"]
        lines += [f"| {g['op']} | {g['phase']} | {g['count']:+d} | {g['bytes'] / 1e9:+.2f} |"
                  for g in growth(r, base, top)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/census.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224, help="image size in pixels")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--top", type=int, default=15, help="ops listed per prompted method by growth (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the fake tensors live, whose autocast")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    if not set(args.methods) <= set(METHODS) or len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods: expected distinct names from {', '.join(METHODS)}, got {','.join(args.methods)}")
    for name in ("batch", "img"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
    if args.top < 0:
        parser.error(f"--top: expected an int >= 0, got {args.top}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device: expected cpu or cuda (with a GPU present), got {args.device!r}")
    import timm

    if not timm.is_model(args.model):
        parser.error(f"--model: expected a timm model name (see timm.list_models('vit*')), got {args.model!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {m: census(m, args.model, args.batch, args.img, device=args.device) for m in args.methods}
    print(f"Op census of one train step (forward + backward, bf16 autocast, no optimizer), {args.model}, "
          f"batch {args.batch}, {args.img} px, fake tensors on {args.device} (no compute: counts, not times)\n")
    print(format_report(results, args.top))
    if args.json:
        base = results.get("no_prompts")
        Path(args.json).write_text(json.dumps(
            {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results,
             "ratios": {m: ratios(r, base) for m, r in results.items()} if base else {}}, indent=2))


if __name__ == "__main__":
    main()
