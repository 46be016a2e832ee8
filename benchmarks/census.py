"""Op census of one ViT train step: a compute-free proxy for GPU cost (docs/how-it-works.md, 'Targets').

    python benchmarks/census.py                      # ViT-B/16, batch 128, 224 px, bf16 autocast, on CPU
    python -m benchmarks.census --methods no_prompts,vpt_deep,tcpa_fused,tcpa_dense --top 10 --json census.json
    python benchmarks/census.py --model hf_vit_base_patch16_224       # one model of another family
    python benchmarks/census.py --all-families --top 0                # every family, then a summary table

Models (``--model``): any timm ViT name (``timm.list_models('vit*')``, ``'eva02*'``, ...), or one of
``hf_vit_base_patch16_224`` (Hugging Face ``ViTForImageClassification`` at ViT-B/16's config, 100 labels, SDPA,
built without weights) and ``open_clip_vit_b_16`` (the whole ``open_clip.create_model("ViT-B-16",
pretrained=None)``; its vision tower is prompted and the step is ``encode_image`` through a linear head of 100
classes added outside the model). ``--all-families`` runs no_prompts, vpt_deep (36 prompts) and tcpa_fused (pools
18 + 18, top-k 10) on each of ``ALL_FAMILIES``: timm ``vit_base_patch16_224`` (timm ``Block``), timm DINOv3
ViT-B/16 and EVA-02-B/14 (timm ``EvaBlock``), the Hugging Face ViT-B/16 and open_clip ViT-B-16, prints one table
per model and a summary of each prompted method against that model's own no-prompt model, with the targets: timm
``Block`` tcpa <= 1.05x ops and <= 0.95x bytes, the other families <= 1.10x ops and <= 1.01x bytes, each below
its vpt_deep in ops and bytes. ``no_prompts`` is the frozen model with a new (HF: its own) head and a gradient
required at its patch-embedding output (HF: the embeddings' output; open_clip: ``conv1``'s), so the backward
crosses every block; for HF and open_clip its frozen backbone runs in eval mode, as the prompted models keep it.

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
  traffic (GEMM operand reads included; an in-place op's tensor counts as read and written; a ``*_like``
  factory's template counts as read, which overstates a little). A broadcast (stride-0, expanded) dimension
  counts once, as the elements the tensor addresses: ``nn.MultiheadAttention`` (open_clip) projects its transposed
  input with a bmm on the weight expanded over the sequence, which a GPU reads once, not once per token.
- bytes saved for backward: the storages the autograd graph keeps (``saved_tensors_hooks``), each once,
  counting only storages allocated during the step (parameters, buffers and inputs are left out).

The kernels' launch plans (the attention backward's batch groups or key splits, the matching backward's
programs) depend on the GPU's SM count: ``--sm-count`` (default 132, an H100 SXM) plans them as on such a GPU.

Caveats: on CPU the census follows CPU autocast, whose cast rules differ a little from CUDA's (``--device cuda``
takes CUDA's, with a GPU); a custom op counts as one launch whatever its kernel does; the figures count work
and traffic, not time (a fused kernel and an elementwise op weigh the same as ops).
"""

import argparse
import contextlib
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (first: backend="triton" on CPU fake tensors needs the interpreter)
import tcpa_kernels as tk  # noqa: E402
from benchmarks.cli import at_least, method_list  # noqa: E402
from tcpa_kernels import bench  # noqa: E402
from tcpa_kernels._backend import assume_sm_count  # noqa: E402

METHODS = bench.MODEL_METHODS
DEFAULT_METHODS = ("no_prompts", "vpt_deep", "tcpa_fused")
PHASES = ("forward", "backward")
NUM_CLASSES = 100
H100_SMS = 132  # streaming multiprocessors of an H100 SXM: the launch plans the census counts by default


def hf_vit_base_patch16_224(img: int = 224) -> nn.Module:
    """Hugging Face ViT-B/16 with a 100-class head, random weights (nothing downloaded)."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=img, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, num_labels=NUM_CLASSES, attn_implementation="sdpa"))


def open_clip_vit_b_16(img: int = 224) -> nn.Module:
    """The whole open_clip ViT-B-16 CLIP model (vision and text towers), random weights (nothing downloaded)."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    if img != 224:
        model.visual.set_input_size(img)
    return model


# model name -> factory(img) of the plain model, for the families timm does not name
OTHER_MODELS = {"hf_vit_base_patch16_224": hf_vit_base_patch16_224, "open_clip_vit_b_16": open_clip_vit_b_16}
ALL_FAMILIES = ("vit_base_patch16_224", "vit_base_patch16_dinov3", "eva02_base_patch14_224", *OTHER_MODELS)
# (family, tcpa ops at most, tcpa bytes at most) over the model's own no_prompts; every tcpa also below its vpt_deep
TARGETS = {"timm Block": (1.05, 0.95)}
OTHER_TARGET = (1.10, 1.01)
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
    """Bytes of the elements each tensor addresses: a broadcast (stride-0) dimension counts once."""
    return sum(math.prod(n for n, step in zip(t.shape, t.stride()) if step != 0) * t.element_size() for t in tensors)


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


def family(model: nn.Module) -> str:
    """The family the targets go by: "timm <block class>", "Hugging Face" or "open_clip"."""
    if "timm" in type(model).__module__.split("."):
        return f"timm {type(model.blocks[0]).__name__}"
    return "Hugging Face" if "transformers" in type(model).__module__.split(".") else "open_clip"


def model_family(model_name: str) -> str:
    """``family`` of a model named as ``--model`` takes it (a timm model is built on the meta device)."""
    if model_name in OTHER_MODELS:
        return "Hugging Face" if model_name.startswith("hf_") else "open_clip"
    import timm

    with torch.device("meta"):
        return family(timm.create_model(model_name, pretrained=False))


def model_methods(model_name: str) -> tuple[str, ...]:
    """The METHODS the model can run: the dense-mask baseline exists for timm's ``Block`` only."""
    return tuple(m for m in METHODS if m != "tcpa_dense") if model_name in OTHER_MODELS else bench.model_methods(
        model_name)


class HFLogits(nn.Module):
    """A Hugging Face image classifier as ``images -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


class OpenCLIPClassifier(nn.Module):
    """An open_clip CLIP model's (or vision tower's) image features through a linear head added outside it."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        tower = getattr(model, "visual", model)
        self.head = nn.Linear(tower.output_dim, num_classes, device=next(model.parameters()).device)

    def forward(self, images):
        return self.head(self.model.encode_image(images) if hasattr(self.model, "encode_image") else self.model(images))


def prompted_model(method: str, model: nn.Module, *, pool_size: int = 18, topk: int = 10,
                   backend: str = "triton") -> tuple[nn.Module, nn.Module]:
    """(net, model): ``net(images)`` gives logits, ``model`` is the HF or open_clip ``model`` prompted by
    ``method`` (no_prompts, vpt_deep or tcpa_fused) in place, in train mode (the one whose matching loss counts).
    no_prompts: frozen, its head trains, a gradient required at the patch-embedding output, backbone in eval."""
    hf = family(model) == "Hugging Face"
    if hf and not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise TypeError(f"model: expected a Hugging Face image classifier (with a classifier), got "
                        f"{type(model).__name__}")
    if method == "no_prompts":
        model.requires_grad_(False)
        embed = model.base_model.embeddings if hf else getattr(model, "visual", model).conv1
        embed.register_forward_hook(lambda module, args, out: out.requires_grad_())
        if hf:
            model.classifier.requires_grad_(True)
    elif method == "vpt_deep":
        tk.apply_vpt(model, num_prompts=2 * pool_size, deep=True)
    elif method == "tcpa_fused":
        tk.apply_tcpa(model, pool_size_cls=pool_size, pool_size_img=pool_size, topk_cls=topk, topk_img=topk,
                      backend=backend)
    else:
        raise ValueError(f"method: expected no_prompts, vpt_deep or tcpa_fused for {family(model)}, got {method!r}")
    net = (HFLogits(model) if hf else OpenCLIPClassifier(model, NUM_CLASSES)).train()
    if method == "no_prompts":
        model.eval()  # the frozen backbone, as the prompted models keep theirs
    return net, model


def census(method: str, model_name: str | Callable[[], nn.Module] = "vit_base_patch16_224", batch: int = 128,
           img: int = 224, *, pool_size: int = 18, topk: int = 10, device: str = "cpu",
           dtype: torch.dtype = torch.bfloat16) -> dict:
    """The census (``count_step``'s dict plus ``"method"``) of one train step of ``method`` (one of ``METHODS``),
    built as the profiler builds it, in train mode: cross entropy (+ 0.01 * matching loss for TCPA) under
    autocast to ``dtype``, then backward.

    ``model_name``: a timm name (the model built by ``bench.build_model``), a name in ``OTHER_MODELS``, or a
    factory of a plain Hugging Face image classifier or open_clip model / vision tower taking ``img`` px images
    (``prompted_model`` prompts it)."""
    if isinstance(model_name, str) and model_name not in OTHER_MODELS:
        model = bench.build_model(method, model_name=model_name, img_size=img, pool_size=pool_size, topk=topk,
                                  device=torch.device(device), backend="triton").train()
        net, num_classes = model, model.num_classes
    else:
        plain = (OTHER_MODELS[model_name](img) if isinstance(model_name, str) else model_name()).to(device)
        net, model = prompted_model(method, plain, pool_size=pool_size, topk=topk)
        num_classes = NUM_CLASSES
    images = torch.randn(batch, 3, img, img, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def loss_fn(net, images, labels):
        with torch.autocast(device, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
            return loss + 0.01 * tk.get_matching_loss(model) if method.startswith("tcpa") else loss

    return {"method": method, **count_step(net, (images, labels), loss_fn)}


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


def summary(per_model: dict[str, dict], families: dict[str, str]) -> list[dict]:
    """Per model: tcpa_fused's and vpt_deep's ops and bytes ratios over the model's own no_prompts, the target and
    whether tcpa_fused meets it (at most the target's ops and bytes, and below vpt_deep in both)."""
    rows = []
    for name, results in per_model.items():
        base = results["no_prompts"]
        tcpa, vpt = ratios(results["tcpa_fused"], base), ratios(results["vpt_deep"], base)
        ops, traffic = TARGETS.get(families[name], OTHER_TARGET)
        rows.append({"model": name, "family": families[name], "tcpa_ops": tcpa["ops"], "tcpa_bytes": tcpa["bytes"],
                     "vpt_ops": vpt["ops"], "vpt_bytes": vpt["bytes"], "target_ops": ops, "target_bytes": traffic,
                     "met": tcpa["ops"] <= ops and tcpa["bytes"] <= traffic and tcpa["ops"] < vpt["ops"]
                     and tcpa["bytes"] < vpt["bytes"]})
    return rows


def format_summary(rows: list[dict]) -> str:
    """The summary table of ``summary``'s rows."""
    lines = ["| model | family | tcpa ops ratio | tcpa bytes ratio | vpt ops ratio | vpt bytes ratio "
             "| target: tcpa ops, bytes (and < vpt) | met |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['family']} | {r['tcpa_ops']:.3f}x | {r['tcpa_bytes']:.3f}x | {r['vpt_ops']:.3f}x | "
              f"{r['vpt_bytes']:.3f}x | <= {r['target_ops']:.2f}x, <= {r['target_bytes']:.2f}x | "
              f"{'yes' if r['met'] else 'no'} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/census.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=f"timm ViT name, or one of {', '.join(OTHER_MODELS)} "
                        "(default vit_base_patch16_224)")
    parser.add_argument("--all-families", action="store_true",
                        help=f"every model of {', '.join(ALL_FAMILIES)}, with the default methods, then a summary")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224, help="image size in pixels")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--top", type=int, default=15, help="ops listed per prompted method by growth (0: none)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the fake tensors live, whose autocast")
    parser.add_argument("--sm-count", type=int, default=H100_SMS,
                        help=f"plan the kernels' launches as on a GPU of this many SMs (default {H100_SMS}, an "
                        "H100 SXM; 0: as the device says, none off CUDA)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.all_families and (args.model is not None or args.methods is not None):
        parser.error(f"--all-families: runs {','.join(DEFAULT_METHODS)} on {', '.join(ALL_FAMILIES)}; "
                     "drop --model and --methods")
    args.model = args.model or "vit_base_patch16_224"
    args.methods = method_list(parser, args.methods or ",".join(DEFAULT_METHODS), METHODS)
    at_least(parser, args, 1, "batch", "img")
    at_least(parser, args, 0, "top", "sm_count")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device: expected cpu or cuda (with a GPU present), got {args.device!r}")
    import timm

    if args.model not in OTHER_MODELS and not timm.is_model(args.model):
        parser.error(f"--model: expected a timm model name (see timm.list_models('vit*')) or one of "
                     f"{', '.join(OTHER_MODELS)}, got {args.model!r}")
    if "tcpa_dense" in args.methods and "tcpa_dense" not in model_methods(args.model):
        parser.error(f"--methods: tcpa_dense (the dense-mask baseline) runs on timm's Block only, not on {args.model}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = ALL_FAMILIES if args.all_families else (args.model,)
    per_model, families = {}, {}
    for i, name in enumerate(models):
        with assume_sm_count(args.sm_count) if args.sm_count else contextlib.nullcontext():
            per_model[name] = {m: census(m, name, args.batch, args.img, device=args.device) for m in args.methods}
        families[name] = model_family(name)
        print("\n" * (i > 0) + f"Op census of one train step (forward + backward, bf16 autocast, no optimizer), "
              f"{name} ({families[name]}), batch {args.batch}, {args.img} px, fake tensors on {args.device} "
              "(no compute: counts, not times)\n")
        print(format_report(per_model[name], args.top), flush=True)
    rows = summary(per_model, families) if args.all_families else None
    if rows:
        print("\nSummary: each prompted method over its own model's no_prompts (census counts, not times)\n")
        print(format_summary(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings["versions"] = {name: bench._package_version(name) for name in ("torch", "triton", "timm",
                                                                             "transformers", "open_clip_torch")}

        def entry(results):
            base = results.get("no_prompts")
            return {"results": results, "ratios": {m: ratios(r, base) for m, r in results.items()} if base else {}}

        data = ({"settings": settings, "models": {name: {"family": families[name], **entry(results)}
                                                  for name, results in per_model.items()}, "summary": rows}
                if args.all_families else {"settings": settings, "family": families[args.model],
                                           **entry(per_model[args.model])})
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
