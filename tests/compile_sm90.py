"""Compile the kernels for Hopper (sm_90) with Triton's real compiler, down to a cubin, on a machine without a GPU.
Run as a script with TRITON_INTERPRET=0 (tests/test_compile.py does); prints one line per kernel.

Default: a subset in which every constexpr branch appears (each dtype, mask encoding, softmax mode, head-dim padding,
atomic and deterministic reductions), ~2 minutes on 2 cores. ``--all``: the full matrix (~12 minutes)."""

import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tcpa_kernels.ops import _attention_kernels as kernels  # noqa: E402
from tcpa_kernels.ops import selection  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, pointer_types, constexprs):
    """Scalars not named in pointer_types are i32 (fp32 for the softmax scales)."""
    scalars = {"qk_scale": "fp32", "sm_scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, scalars.get(name, "i32"))
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET)
    assert compiled.asm["cubin"], fn.__name__
    print(f"{fn.__name__} {constexprs} shared={compiled.metadata.shared}", flush=True)


# (dtype, mask mode, renormalize, D_PAD)
SUBSET = [("bf16", 1, False, 128), ("fp32", 0, True, 64), ("fp16", 1, True, 64)]
FULL = list(itertools.product(("fp16", "bf16", "fp32"), (0, 1), (False, True), (64, 128)))


def main(variants):
    for dtype, mask_mode, renormalize, d_pad in variants:
        mask_type = "*u8" if mask_mode == 0 else "*i64"
        flags = dict(BLOCK_M=64, BLOCK_N=64, D_PAD=d_pad, MASK_MODE=mask_mode, RENORMALIZE=renormalize,
                     PRECISION="ieee" if dtype == "fp32" else "tf32")
        ptrs = {name: f"*{dtype}" for name in ("Q", "K", "V", "PK", "PV", "O", "DO", "DQ", "KEYS", "VALS")}
        ptrs |= {"MASK": mask_type, "BITS": mask_type, "LSE": "*fp32", "DELTA": "*fp32"}
        compile_kernel(kernels._fwd_kernel, ptrs, flags)
        compile_kernel(kernels._bwd_dq_kernel, ptrs, flags)
        for is_prompt, atomic in ((False, False), (True, False), (True, True)):
            grad = "*fp32" if is_prompt else f"*{dtype}"
            compile_kernel(kernels._bwd_dkdv_kernel, ptrs | {"DKEYS": grad, "DVALS": grad},
                           flags | dict(IS_PROMPT=is_prompt, ATOMIC=atomic))
    compile_kernel(selection._topk_bits_kernel, {"SCORES": "*fp32", "BITS": "*i64"}, dict(BLOCK_T=32, E_PAD=64))


if __name__ == "__main__":
    main(FULL if "--all" in sys.argv else SUBSET)
