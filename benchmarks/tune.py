"""Tune the kernels' launch configurations: the attention kernels' (``LAUNCH_CONFIGS`` in
tcpa_kernels/ops/_attention_kernels.py), the matching kernels' (``LAUNCH`` in tcpa_kernels/ops/_match_kernels.py)
and the prompt K/V kernels' (``LAUNCH`` and ``SET_GROUPS`` in tcpa_kernels/ops/_prompt_kv_kernels.py).

  python benchmarks/tune.py --offline   no GPU needed: compile every candidate for sm_90 and report what ptxas made
                                        of it (registers, spills, shared memory, wgmma) -> docs/sm90-resources.*
  python benchmarks/tune.py             on a GPU: time every candidate of every kernel (attention at the shapes
                                        of docs/how-it-works.md, 'Targets', matching fused with the LayerNorm at
                                        ViT-B/16 shape, beside F.layer_norm of the same rows, the prompt K/V pass
                                        at ViT-B/16 shape, one dropout mask or one per sample), check its result
                                        against the current table's, write benchmarks/results/tune-<device>.json
                                        (then edit the tables by hand)
  python benchmarks/tune.py --smoke     the GPU procedure on CPU (interpreter, tiny shapes): checks the script only

Each kernel (forward, backward: one launch each) is timed alone, the other at its table entry.
"""

import argparse
import concurrent.futures
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

# attention: (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    "16-bit": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (64, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2),
               (128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 64, 4, 3),
               (32, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (128, 128, 8, 2)],
    "fp32": [(64, 64, 4, 3), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 64, 4, 2),
             (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 2, 1)],
}
KERNEL_LAUNCHES = [("fwd", {}), ("bwd", dict(ATOMIC=False))]
# (label, B, H, N, P, D, topk) at which candidates are timed on a GPU
GPU_SHAPES = [("vit_b_b128_n197_p36_k10", 128, 12, 197, 36, 64, 10),  # docs/how-it-works.md, 'Targets'
              ("vit_l_b32_n577_p200_l4_k12", 32, 16, 577, 200, 64, 12)]
SMOKE_SHAPES = [("cpu_smoke_b1_n40_p8_k2", 1, 2, 40, 8, 32, 2)]

# matching: the keys of a LAUNCH entry, and candidate values of them (the table's entry first)
MATCH_FIELDS = ("BLOCK_T", "BLOCK_C", "num_warps", "num_stages")
MATCH_CANDIDATES = {
    "fwd": [(64, 32, 8, 1), (32, 32, 8, 1), (64, 64, 8, 1), (128, 32, 8, 1), (64, 32, 4, 1), (32, 64, 8, 1),
            (64, 32, 8, 2)],
    "bwd": [(32, 16, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (32, 16, 4, 1), (64, 16, 8, 1), (16, 16, 4, 1)],
}
MATCH_FLAGS = {"fwd": dict(HAS_W=True, HAS_B=True, HAS_TASKS=False),
               "bwd": dict(NEED_DX=True, NEED_DKEYS=True, HAS_W=True, HAS_RES=True, HAS_TASKS=False)}
# (label, B, N, C, pool_cls, pool_img, topk) at which the matching candidates are timed, and the dtypes of x
MATCH_GPU_SHAPE, MATCH_GPU_DTYPES = ("vit_b_b128_n197_c768_p18+18_k10", 128, 197, 768, 18, 18, 10), ("fp32", "bf16")
MATCH_SMOKE_SHAPE, MATCH_SMOKE_DTYPES = ("cpu_smoke_b1_n9_c32_p3+4_k2", 1, 9, 32, 3, 4, 2), ("fp32", "fp16")
# prompt K/V: the keys of a LAUNCH entry, candidate values (the table's entry first), and the backward's SET_GROUPS
# (programs per block of prompt rows when every sample has its own dropout mask) candidates
KV_FIELDS = ("BLOCK_M", "BLOCK_R", "BLOCK_C", "num_warps", "num_stages")
KV_CANDIDATES = {
    "fwd": [(32, 64, 32, 8, 2), (32, 64, 32, 8, 1), (16, 64, 32, 8, 2), (32, 32, 32, 8, 2), (64, 64, 32, 8, 2),
            (32, 128, 32, 8, 2), (32, 64, 64, 8, 1)],
    "bwd": [(32, 32, 64, 8, 1), (16, 32, 64, 8, 1), (32, 64, 64, 8, 1), (32, 32, 32, 8, 1), (64, 32, 64, 8, 1)],
}
SET_GROUP_CANDIDATES = (8, 1, 2, 4, 16, 32)
# (label, L, P, C, H, D, B): layers, prompts per layer, channels, heads, head dim, samples (the per-sample masks')
KV_GPU_SHAPE = ("vit_b_l12_p36_c768_b128", 12, 36, 768, 12, 64, 128)
KV_SMOKE_SHAPE = ("cpu_smoke_l2_p4_c32_b3", 2, 4, 32, 2, 16, 3)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.sm90` when run as a script (compile workers inherit it)


# ------------------------------------------------------------------------------------------ offline (sm_90)


def _figures(compile_one: Callable[[], dict]) -> dict:
    """ptxas's figures of ``compile_one()``, or the error that stopped it (e.g. out of shared memory: not fatal)."""
    try:
        return compile_one()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def _compile_attention(job: tuple) -> dict:
    from benchmarks import sm90
    from tcpa_kernels.ops import _attention_kernels as kernels

    operand, d_pad, kernel, extra, candidate = job
    block_m, block_n, num_warps, num_stages = candidate
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, MASK_MODE=1, RENORMALIZE=False,
                      PRECISION=kernels.DOT_PRECISION[operand], **extra)
    dtype = "fp32" if operand == "fp32" else "bf16"
    figures = _figures(lambda: sm90.compile_attention(kernel, dtype, constexprs, num_warps, num_stages,
                                                      prompt_dtype="fp32"))
    in_table = kernels.LAUNCH_CONFIGS[(operand, d_pad)][kernel] == candidate
    return {"operand": operand, "d_pad": d_pad, "kernel": kernel, "config": list(candidate), "in_table": in_table,
            **figures}


def _compile_match(job: tuple[str, str, tuple]) -> dict:
    """One matching kernel fused with the LayerNorm (NORM, weight and bias), 64 pool entries, fp32 keys and
    statistics, x (and h, dx, dh) in ``x_dtype``: 3xTF32 dots for fp32, two 16-bit MMAs (X16) otherwise."""
    from benchmarks import sm90
    from tcpa_kernels.ops import _match_kernels

    x_dtype, kernel, candidate = job
    fn = {"fwd": _match_kernels._match_fwd_kernel, "bwd": _match_kernels._match_bwd_kernel}[kernel]
    pointers = dict.fromkeys(("KEYS_CLS", "KEYS_IMG", "TERMS", "NORM_W", "NORM_B", "MEAN", "RSTD", "DTERMS",
                              "DKEYS_PARTIAL"), "*fp32") | dict.fromkeys(("X", "H", "DX", "DH", "DRES"), f"*{x_dtype}")
    pointers |= {"BITS": "*i64", "TASKS": "*i64"}
    launch = dict(zip(MATCH_FIELDS, candidate))
    num_warps, num_stages = launch.pop("num_warps"), launch.pop("num_stages")
    constexprs = launch | MATCH_FLAGS[kernel] | dict(NORM=True, E_PAD=64, X16=x_dtype != "fp32")
    figures = _figures(lambda: sm90.compile_fn(fn, pointers, constexprs, num_warps, num_stages))
    in_table = _match_kernels.LAUNCH[kernel] == dict(zip(MATCH_FIELDS, candidate))
    return {"x": x_dtype, "kernel": kernel, "config": list(candidate), "in_table": in_table, **figures}


def _table_row(keys: list, r: dict) -> str:
    """One markdown row: ``keys``, the config (tile, warps, stages), then ptxas's figures or the error."""
    tile_a, tile_b, warps, stages = r["config"]
    cells = [*keys, f"{tile_a}×{tile_b}, {warps}, {stages}" + (" (table)" if r["in_table"] else "")]
    if "error" in r:
        return "| " + " | ".join(cells) + f" | {r['error']} ||||"
    mma = ", ".join(f"{k} {v}" for k, v in r["mma"].items()) or "FFMA only"
    cells += [r["registers"], r["spill_ops"], f"{r['shared_bytes'] / 1024:.0f}", mma]
    return "| " + " | ".join(map(str, cells)) + " |"


def offline(out_dir, workers):
    os.environ["TRITON_INTERPRET"] = "0"
    jobs = [(operand, d_pad, kernel, extra, candidate) for operand in CANDIDATES for d_pad in (64, 128)
            for kernel, extra in KERNEL_LAUNCHES for candidate in CANDIDATES[operand]]
    match_jobs = [(x_dtype, kernel, candidate) for x_dtype in ("fp32", "bf16") for kernel in MATCH_CANDIDATES
                  for candidate in MATCH_CANDIDATES[kernel]]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        rows, match_rows = pool.map(_compile_attention, jobs), pool.map(_compile_match, match_jobs)
        rows, match_rows = list(rows), list(match_rows)
    import triton

    columns = "| registers | spills | shared KB | mma |"
    lines = [f"# sm_90 compile report (Triton {triton.__version__}, ptxas; no GPU involved)", "",
             "Produced by `python benchmarks/tune.py --offline`: compile-time figures, not timings. `spills` counts "
             "LDL+STL instructions in the SASS. Arguments aligned as at ViT shapes.", "",
             "## Attention", "",
             "Default branch (selection bits, renormalize=False), bf16 or fp32 operands with fp32 prompt K/V (as the "
             "model passes them). (table): the entry of LAUNCH_CONFIGS.", "",
             "| operand | D_PAD | launch | BLOCK_M×BLOCK_N, warps, stages " + columns,
             "|---|---|---|---|---|---|---|---|"]
    lines += [_table_row([r["operand"], r["d_pad"], r["kernel"]], r) for r in rows]
    lines += ["", "## Matching", "",
              "Fused with the block's LayerNorm (NORM, weight and bias; the backward with dx and the key gradient), "
              "64 pool entries (E_PAD, as pools 18+18), fp32 keys and statistics; x fp32 (3xTF32 dots) or bf16 "
              "(X16: two bf16 MMAs per product). (table): the entry of LAUNCH in _match_kernels.py.", "",
              "| x | launch | BLOCK_T×BLOCK_C, warps, stages " + columns, "|---|---|---|---|---|---|---|"]
    lines += [_table_row([r["x"], r["kernel"]], r) for r in match_rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"triton": triton.__version__, "rows": rows, "matching": match_rows}
    (out_dir / "sm90-resources.json").write_text(json.dumps(report, indent=1))
    (out_dir / "sm90-resources.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------ timed (GPU)


def _relative_error(result, baseline):
    worst = 0.0
    for got, want in zip(result, baseline):
        if want is not None:
            scale = want.double().abs().max().clamp_min(1e-12)
            worst = max(worst, float((got.double() - want.double()).abs().max() / scale))
    return worst


def _tolerance(dtype) -> float:  # dtype: torch.dtype
    import torch

    return 1e-4 if dtype == torch.float32 else 2e-2  # only the summation order differs between configs


def _float_check(dtype) -> Callable[[tuple, list], dict]:
    """``_sweep``'s ``compare`` for results of float tensors: their worst relative error within ``_tolerance``."""
    def compare(result, baseline) -> dict:
        error = _relative_error(result, baseline)
        return {"max_rel_diff": error, "ok": error <= _tolerance(dtype)}

    return compare


def _sweep(label: str, kernel: str, step: Callable[[], tuple], compare: Callable[[tuple, list], dict],
           install: Callable[[tuple], None], current: tuple, candidates: list[tuple], reps: int) -> dict:
    """Time ``step()`` at the table's entry ``current`` of ``kernel`` and at every candidate (``install(config)``
    puts one in the table), each checked by ``compare(result, baseline) -> {..., "ok": bool}`` against the
    result at ``current``: {"table", "candidates" (rows), "best" (the fastest that is ok), "speedup_over_table"}."""
    from tcpa_kernels import bench

    device = bench.default_device()
    baseline = [t.clone() for t in step()]
    rows = []
    for candidate in dict.fromkeys([current, *candidates]):
        install(candidate)
        try:
            checks = compare(step(), baseline)
            rows.append({"config": list(candidate), "ms": bench.time_ms(step, device, reps=reps), **checks})
        except Exception as exc:  # e.g. out of shared memory on this device: reported, not fatal
            rows.append({"config": list(candidate), "error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            install(current)
        print(f"{label} {kernel} {candidate}: {rows[-1]}", flush=True)
    good = [r for r in rows if r.get("ok")]
    best = min(good, key=lambda r: r["ms"]) if good else None
    return {"table": list(current), "candidates": rows, "best": best and best["config"],
            "speedup_over_table": best and rows[0].get("ms") and rows[0]["ms"] / best["ms"]}


def _tune_shape(shape, dtype, candidates, smoke, report, save):
    """Time every candidate of each attention kernel at one shape, the other at its table entry, into ``report``;
    ``save()`` after each kernel."""
    import torch

    from tcpa_kernels import bench
    from tcpa_kernels.ops import _attention_kernels as kernels

    label, B, H, N, P, D, topk = shape
    tensors, scores = bench.op_inputs(B, H, N, P, D, dtype, bench.default_device())
    tensors = [t.detach() for t in tensors]
    grad_out = torch.randn_like(tensors[0])
    selection = bench.op_selection(scores, P, topk)
    scale = D**-0.5
    out, lse = kernels.attention_forward(*tensors, *selection.op_args(), scale, False)
    steps = {"fwd": lambda: kernels.attention_forward(*tensors, *selection.op_args(), scale, False),
             "bwd": lambda: kernels.backward_grads(grad_out, *tensors, out, lse, selection, scale, False, True,
                                                       (True,) * 5)}
    table = kernels.LAUNCH_CONFIGS[kernels.config_key(D, dtype)]

    compare = _float_check(dtype)

    report |= {"shape": label, "dims": dict(B=B, H=H, N=N, P=P, D=D, topk=topk), "kernels": {}}
    for kernel, step in steps.items():
        def install(config, kernel=kernel):
            table[kernel] = config
            kernels.forget_plans()  # the launch plans read the table when made

        report["kernels"][kernel] = _sweep(label, kernel, step, compare, install, table[kernel], candidates,
                                           reps=3 if smoke else 20)
        save()


def _tune_matching(shape: tuple, x_dtype: str, smoke: bool, report: dict, save: Callable[[], None]) -> None:
    """Time every candidate of each matching kernel, fused with the LayerNorm as the model runs it
    (``norm_match_select``; backward: dx, dkeys summed over the programs' partials), at one shape and x dtype, and
    ``F.layer_norm`` of the same rows forward and backward (the reference figure), into ``report``; ``save()``
    after each kernel."""
    import torch
    import torch.nn.functional as F

    from tcpa_kernels import bench
    from tcpa_kernels.ops import _match_kernels as kernels

    label, B, N, C, pool_cls, pool_img, topk = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[x_dtype]
    device, eps, reps = bench.default_device(), 1e-6, 3 if smoke else 20
    x = torch.randn(B, N, C, device=device).to(dtype)  # [B, N, C] the block input
    keys_cls = torch.empty(pool_cls, C, device=device).uniform_(-1, 1)  # [Pc, C] fp32, as the pools are initialised
    keys_img = torch.empty(pool_img, C, device=device).uniform_(-1, 1)  # [Pi, C]
    weight = 1 + 0.1 * torch.randn(C, device=device)  # [C] the LayerNorm's (fp32, frozen)
    bias = 0.1 * torch.randn(C, device=device)
    args = (x, keys_cls, keys_img, None, None, weight, bias, eps, True, 1, topk, topk)  # one prefix token, no bank
    terms, bits, h, mean, rstd = kernels.forward(*args)
    dterms, dh = torch.randn_like(terms), torch.randn_like(h)  # [B, N] fp32, [B, N, C] in x's dtype
    dres = torch.randn_like(x)  # the residual's gradient, added to dx as in a block's backward

    def backward():  # (dx [B, N, C], dkeys [Pc + Pi, C])
        dx, partials = kernels.backward(dterms, dh, dres, x, keys_cls, keys_img, None, None, bits, weight, mean, rstd,
                                        1, topk, topk, True, True)
        return dx, partials.sum(0)

    def compare(result, baseline) -> dict:
        """Relative error of the float outputs, and tokens whose selection differs (a near tie that another
        summation order breaks the other way: at most one token in 10^4)."""
        error = _relative_error(*zip(*[(g, w) for g, w in zip(result, baseline) if w.is_floating_point()]))
        differ = sum(int((g != w).sum()) for g, w in zip(result, baseline) if not w.is_floating_point())
        return {"max_rel_diff": error, "bits_differ": differ,
                "ok": error <= _tolerance(dtype) and differ <= B * N // 10**4}

    x_leaf, norm_args = x.clone().requires_grad_(), ((C,), weight.to(dtype), bias.to(dtype), eps)
    h_ref = F.layer_norm(x_leaf, *norm_args)
    layer_norm = {"fwd": lambda: F.layer_norm(x, *norm_args),
                  "bwd": lambda: torch.autograd.grad(h_ref, x_leaf, dh, retain_graph=True)}
    report |= {"shape": label, "dims": dict(B=B, N=N, C=C, pool_cls=pool_cls, pool_img=pool_img, topk=topk),
               "dtype": x_dtype, "layer_norm_ms": {k: bench.time_ms(f, device, reps=reps)
                                                      for k, f in layer_norm.items()}, "kernels": {}}
    for kernel, step in {"fwd": lambda: kernels.forward(*args), "bwd": backward}.items():
        def install(config, kernel=kernel):
            kernels.LAUNCH[kernel] = dict(zip(MATCH_FIELDS, config))
            kernels.forget_plans()  # the launch plans read LAUNCH when made

        current = tuple(kernels.LAUNCH[kernel][field] for field in MATCH_FIELDS)
        report["kernels"][kernel] = _sweep(f"{label} x={x_dtype}", kernel, step, compare, install, current,
                                           MATCH_CANDIDATES[kernel][: 2 if smoke else None], reps)
        save()


def _tune_prompt_kv(shape: tuple, smoke: bool, report: dict, save: Callable[[], None]) -> None:
    """Time every candidate of the prompt K/V kernels as the model runs them (fp32 prompts, each layer's LayerNorm
    and the K/V rows of a packed [3C, C] weight with its bias, prompt dropout 0.1) at one shape: forward and
    backward with one dropout mask for the batch (``shared_mask``, M = P rows), then, with a mask per sample
    (``per_sample``: the B samples read the same P rows), the forward and the backward's ``SET_GROUPS``; into
    ``report``, ``save()`` after each kernel."""
    import torch

    from tcpa_kernels import bench
    from tcpa_kernels.ops import _prompt_kv_kernels as kernels
    from tcpa_kernels.ops import _prompt_kv_table

    label, L, P, C, H, D, B = shape
    device, reps, p_drop = bench.default_device(), 3 if smoke else 20, 0.1
    torch.manual_seed(0)
    layers = [(w, w, 1 + 0.1 * torch.randn(C, device=device), 0.1 * torch.randn(C, device=device), b, b)
              for w, b in ((torch.randn(3 * C, C, device=device) / C**0.5, 0.1 * torch.randn(3 * C, device=device))
                           for _ in range(L))]  # per layer: the packed weight (K rows from C, V from 2C), norm, bias
    x = torch.randn(L, P, C, device=device)  # [L, P, C] every layer's prompt tokens
    seed = _prompt_kv_table.dropout_seed(device)

    compare = _float_check(torch.float32)

    def install_launch(kernel):
        def install(config):
            kernels.LAUNCH[kernel] = dict(zip(KV_FIELDS, config))
            kernels.forget_plans()  # the launch plans read LAUNCH when made
        return install

    def install_groups(config):
        kernels.SET_GROUPS = config[0]
        kernels.forget_plans()  # the backward's plan reads SET_GROUPS when made

    report |= {"shape": label, "dims": dict(L=L, P=P, C=C, H=H, D=D, B=B), "p_drop": p_drop, "kernels": {}}
    for mode, sets in (("shared_mask", 1), ("per_sample", B)):
        plan = _prompt_kv_table.kv_layers(torch.float32, C, layers, sets, H, D, (C, 2 * C, C, 2 * C), 1e-6,
                                          sets > 1)
        kv, mean, rstd = kernels.forward(x, plan, seed, p_drop)
        grad = torch.randn_like(kv)  # [L, sets, 2, H, P, D]
        steps = {"fwd": lambda plan=plan: kernels.forward(x, plan, seed, p_drop),
                 "bwd": lambda plan=plan, grad=grad, mean=mean, rstd=rstd: (
                     kernels.backward(grad, x, mean, rstd, plan, seed, p_drop),)}
        for kernel, step in steps.items():
            name, current = f"{mode}_{kernel}", tuple(kernels.LAUNCH[kernel][field] for field in KV_FIELDS)
            candidates, install = KV_CANDIDATES[kernel], install_launch(kernel)
            if mode == "per_sample" and kernel == "bwd":  # its launch the table's; its number of partials
                name, current, install = f"{name}_set_groups", (kernels.SET_GROUPS,), install_groups
                candidates = [(groups,) for groups in SET_GROUP_CANDIDATES]
            report["kernels"][name] = _sweep(label, name, step, compare, install, current,
                                             candidates[: 2 if smoke else None], reps)
            save()


def timed(shapes: list[tuple], match_shape: tuple, match_dtypes: tuple[str, ...], kv_shape: tuple, smoke: bool,
          out_path: Path, only: str | None = None) -> dict:
    import torch

    from tcpa_kernels import bench
    from tcpa_kernels.ops._function import operand_class

    dtype = torch.float32 if smoke else torch.bfloat16
    candidates = CANDIDATES[operand_class(dtype)][: 2 if smoke else None]
    report = {"environment": bench.environment(bench.default_device()), "dtype": str(dtype), "smoke": smoke,
              "shapes": [], "matching": [], "prompt_kv": []}
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every kernel: a run cut short keeps what it timed
        out_path.write_text(json.dumps(report, indent=1))

    for x_dtype in match_dtypes if only in (None, "matching") else ():  # first: the shorter sweep
        report["matching"].append({})
        _tune_matching(match_shape, x_dtype, smoke, report["matching"][-1], save)
    for shape in shapes if only in (None, "attention") else ():
        report["shapes"].append({})
        _tune_shape(shape, dtype, candidates, smoke, report["shapes"][-1], save)
    if only in (None, "prompt_kv"):  # last: ~1% of a step's GPU time (run it alone with --only prompt_kv)
        report["prompt_kv"].append({})
        _tune_prompt_kv(kv_shape, smoke, report["prompt_kv"][-1], save)
    for shape in report["prompt_kv"] + report["matching"] + report["shapes"]:
        for kernel, r in shape["kernels"].items():
            reference = f", F.layer_norm {shape['layer_norm_ms'][kernel]:.3f} ms" if "layer_norm_ms" in shape else ""
            print(f"{shape['shape']:32s} {shape.get('dtype', ''):4s} {kernel} table {r['table']} -> "
                  f"best {r['best']} ({r['speedup_over_table'] or 0:.2f}x{reference})")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="compile for sm_90 and report resources (no GPU)")
    mode.add_argument("--smoke", action="store_true", help="the timed procedure on CPU at a tiny shape")
    parser.add_argument("--only", choices=("attention", "matching", "prompt_kv"), help="time only these kernels")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/ offline, benchmarks/results/ timed)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles (offline)")
    args = parser.parse_args(argv)
    if args.offline and args.only:
        parser.error("--only applies to the timed modes; --offline compiles every kernel")
    if args.offline:
        return offline(args.out or ROOT / "docs", args.workers)
    import benchmarks.interpreter  # noqa: F401  (--smoke: CPU tensors run in the Triton interpreter)
    from tcpa_kernels import bench

    device = bench.default_device()
    if device.type != "cuda" and not args.smoke:
        sys.exit("benchmarks/tune.py times kernels on a GPU: use --offline (compile report) or --smoke here")
    out = (args.out or ROOT / "benchmarks" / "results") / f"tune-{bench.device_slug(device)}.json"
    if args.smoke:
        return timed(SMOKE_SHAPES, MATCH_SMOKE_SHAPE, MATCH_SMOKE_DTYPES, KV_SMOKE_SHAPE, True, out, args.only)
    return timed(GPU_SHAPES, MATCH_GPU_SHAPE, MATCH_GPU_DTYPES, KV_GPU_SHAPE, False, out, args.only)


if __name__ == "__main__":
    main()
