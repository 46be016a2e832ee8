"""Compile the kernels for Hopper (sm_90) with Triton's real compiler, down to a cubin, on a machine without a GPU,
at the launch configurations the library uses (LAUNCH_CONFIGS). Run as a script with TRITON_INTERPRET=0
(tests/test_compile.py does); prints one line per kernel with ptxas's registers and spill instructions, and exits
1 if a variant compiled with ViT-shape (aligned) arguments spills registers, if any needs more shared memory
than an sm_90 block can have (which would fail at launch on the GPU), or if the matching or prompt K/V
kernels have no MMA.

Default: a subset in which every constexpr branch appears (each dtype, fp32 prompts with 16-bit q, mask encoding,
softmax mode, head-dim bucket, atomic and deterministic prompt gradients, a prompt bank, aligned and general
arguments), ~20 s on 2 cores. ``--all``: the full matrix, aligned (40 variants, ~15 minutes)."""

import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

from benchmarks import sm90  # noqa: E402
from tcpa_kernels.ops import _attention_kernels as kernels  # noqa: E402
from tcpa_kernels.ops import _match_kernels, _prompt_kv_kernels, _selection_kernels  # noqa: E402
from tcpa_kernels.ops._function import GROUPED_BACKWARD, config_key  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (dtype of q/k/v, dtype of the prompt K/V, mask mode, renormalize, head dim, aligned arguments)
SUBSET = [("bf16", "fp32", 1, False, 64, True),  # the model's ViT-B/16 layer under bf16 autocast
          ("bf16", "fp32", 1, False, 128, True), ("fp32", "fp32", 0, True, 64, True),
          ("fp16", "fp16", 1, True, 40, False)]
FULL = [(dtype, prompt_dtype, *v, True) for dtype in DTYPES for prompt_dtype in dict.fromkeys((dtype, "fp32"))
        for v in itertools.product((0, 1), (False, True), (64, 128))]
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
LAUNCHES = [("fwd", {}), ("bwd", dict(ATOMIC=False)), ("bwd", dict(ATOMIC=True)),
            ("bwd", dict(ATOMIC=False, SPLIT=True)), ("fwd", dict(HAS_TASKS=True, HAS_LAYOUTS=True)),
            ("bwd", dict(ATOMIC=False, HAS_TASKS=True, HAS_LAYOUTS=True))]  # a prompt bank: a set and pools per sample
GROUPED_LAUNCH = ("bwd", dict(ATOMIC=False, GROUPED=True))  # where the table lets the backward walk batch groups


def main(variants):
    rejected = []
    for dtype, prompt_dtype, mask_mode, renormalize, head_dim, aligned in variants:
        grouped = config_key(head_dim, DTYPES[dtype]) in GROUPED_BACKWARD
        unsplit = (config_key(head_dim, DTYPES[dtype])[1], mask_mode) in kernels.UNSPLIT_BACKWARD
        launches = [launch for launch in LAUNCHES if not (unsplit and launch[1].get("SPLIT"))]
        for kernel, extra in launches + [GROUPED_LAUNCH] * grouped:
            cfg = dict(kernels.launch_config(kernel, 1024, 64, head_dim, DTYPES[dtype], MASK_MODE=mask_mode,
                                             RENORMALIZE=renormalize, **extra))
            num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            constexprs = cfg
            figures = sm90.compile_attention(kernel, dtype, constexprs, num_warps, num_stages, aligned, prompt_dtype)
            line = f"{kernel} {dtype} prompts={prompt_dtype} D={head_dim} aligned={aligned} {constexprs} " \
                   f"warps={num_warps} stages={num_stages} {figures}"
            print(line, flush=True)
            if (aligned and figures["spill_ops"]) or figures["shared_bytes"] > SM90_MAX_SHARED:
                rejected.append(line)
    print(sm90.compile_fn(_selection_kernels._topk_bits_kernel, {"SCORES": "*fp32", "BITS": "*i64", "LAYOUTS": "*i64"},
                          dict(HAS_LAYOUTS=False, BLOCK_T=32, E_PAD=64)), flush=True)
    # matching with fp32 keys, 64 pool entries, at the library's launch configurations, on an fp32 residual stream
    # x (3xTF32 dots) and a bf16 one (X16: two bf16 dots per product): alone (match_select) and fused with the
    # block's LayerNorm (weight and bias; the model's path). Their dot products must run on tensor cores.
    names = ("X", "KEYS_CLS", "KEYS_IMG", "TERMS", "NORM_W", "NORM_B", "H", "MEAN", "RSTD", "DTERMS", "DX",
             "DKEYS_PARTIAL", "DH", "DRES")
    for (name, kernel, extra), norm, x_dtype, bank in itertools.product(
            (("fwd", _match_kernels._match_fwd_kernel, dict(HAS_W=True, HAS_B=True)),
             ("bwd", _match_kernels._match_bwd_kernel, dict(NEED_DX=True, NEED_DKEYS=True, HAS_W=True, HAS_RES=True))),
            (False, True), ("fp32", "bf16"), (False, True)):  # bank: key sets of a prompt bank, a set per sample
        pointers = dict.fromkeys(names, "*fp32") | dict.fromkeys(("X", "H", "DX", "DH", "DRES"), f"*{x_dtype}")
        pointers |= {"BITS": "*i64", "TASKS": "*i64", "LAYOUTS": "*i64"}
        extra = extra | dict(NORM=norm, X16=x_dtype != "fp32", HAS_TASKS=bank, HAS_LAYOUTS=bank)
        launch = dict(_match_kernels.LAUNCH[name])
        num_warps, num_stages = launch.pop("num_warps"), launch.pop("num_stages")
        constexprs = launch | extra | dict(E_PAD=64)
        figures = sm90.compile_fn(kernel, pointers, constexprs, num_warps, num_stages)
        line = f"match_{name} x={x_dtype} {constexprs} warps={num_warps} stages={num_stages} {figures}"
        print(line, flush=True)
        if figures["spill_ops"] or figures["shared_bytes"] > SM90_MAX_SHARED or not figures["mma"]:
            rejected.append(line)
    # the prompt K/V pass (every layer's norm and K/V rows, one launch each way), fp32 (3xTF32) and bf16 weights,
    # with the norm (its weight and bias, and the qkv bias) and without (post-norm blocks), with and without the
    # prompt dropout drawn inside: dots on tensor cores
    for (name, kernel), norm, dtype, dropout in itertools.product(
            (("fwd", _prompt_kv_kernels._kv_fwd_kernel), ("bwd", _prompt_kv_kernels._kv_bwd_kernel)), (True, False),
            ("fp32", "bf16"), (False, True)):
        pointers = dict.fromkeys(("X", "OUT", "G", "DX"), f"*{dtype}") | {"TABLE": "*i64", "SEED": "*i64",
                                                                          "MEAN": "*fp32", "RSTD": "*fp32"}
        launch = dict(_prompt_kv_kernels.LAUNCH[name])
        num_warps, num_stages = launch.pop("num_warps"), launch.pop("num_stages")
        flags = dict(NORM=norm, HAS_W=norm, DROPOUT=dropout) | (dict(HAS_B=norm, HAS_BIAS=True) if name == "fwd"
                                                                   else {})
        constexprs = launch | flags | dict(PRECISION=_prompt_kv_kernels._precision(DTYPES[dtype]))
        figures = sm90.compile_fn(kernel, pointers, constexprs, num_warps, num_stages)
        line = f"prompt_kv_{name} {dtype} {constexprs} warps={num_warps} stages={num_stages} {figures}"
        print(line, flush=True)
        if figures["spill_ops"] or figures["shared_bytes"] > SM90_MAX_SHARED or not figures["mma"]:
            rejected.append(line)
    if rejected:
        print("register spills at ViT-shape arguments, more shared memory than sm_90 has, or matching or the prompt "
              "K/V pass off the tensor cores:\n"
              + "\n".join(rejected), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(FULL if "--all" in sys.argv else SUBSET))
