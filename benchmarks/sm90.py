"""Compile the attention kernels for Hopper (sm_90) with Triton's real compiler on a machine without a GPU, and
read what ptxas made of them: registers, shared memory, spill instructions, matrix instructions.

Set TRITON_INTERPRET=0 before importing this module (the scripts that use it do). Arguments are specialised as
Triton specialises them at run time at ViT shapes: 16-byte-aligned pointers, and strides and head dim divisible
by 16 (``aligned=True``); ``aligned=False`` compiles the general path (odd strides, head dims).
"""

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tcpa_kernels.ops import _attention_kernels as kernels

TARGET = GPUTarget("cuda", 90, 32)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# integer arguments that are multiples of 16 at ViT shapes (head dim 64: every stride is a multiple of D)
_ALIGNED_INTS = {"D", *(f"{prefix}stride_{dim}" for prefix in ("", "p", "o", "do", "d", "dp") for dim in "bhn")}
KERNELS = {"fwd": kernels._fwd_kernel, "bwd": kernels._bwd_kernel}


def _tool(name, *args):
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True).stdout


def compile_attention(kernel, dtype, constexprs, num_warps, num_stages, aligned=True, prompt_dtype=None):
    """Compile one attention kernel variant ('fwd' | 'bwd') to a cubin; dtype: 'bf16' | 'fp16' |
    'fp32' of q/k/v/out, prompt_dtype that of the prompt K/V (default: dtype; prompt gradients are fp32).
    Returns ptxas's figures."""
    constexprs = {"HAS_TASKS": False, "HAS_LAYOUTS": False} | constexprs  # the batch's own prompts unless told
    if kernel == "bwd":
        constexprs = {"SPLIT": False, "GROUPED": False} | constexprs  # one program per (batch, head) unless told
    mask_type = "*u8" if constexprs["MASK_MODE"] == 0 else "*i64"
    prompt_type = f"*{prompt_dtype or dtype}"
    pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers |= {"PK": prompt_type, "PV": prompt_type, "MASK": mask_type, "BITS": mask_type, "LSE": "*fp32",
                 "DELTA": "*fp32", "DPK": "*fp32", "COUNTER": "*i32", "TASKS": "*i64",
                 "LAYOUTS": "*i64"}
    return compile_fn(KERNELS[kernel], pointers, constexprs, num_warps, num_stages, aligned)


def compile_fn(fn, pointers, constexprs, num_warps=4, num_stages=3, aligned=True):
    """Compile a @triton.jit function for sm_90: ``pointers`` maps pointer arguments to types ('*bf16', ...);
    other arguments are constexprs or i32 scalars (fp32 for the softmax scales, loss weights, eps and the dropout
    probability)."""
    scalars = dict.fromkeys(("qk_scale", "sm_scale", "w_cls", "w_img", "eps", "p_drop"), "fp32")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, scalars.get(name, "i32"))
                 for name in fn.arg_names}
    aligned_args = (set(pointers) | _ALIGNED_INTS) if aligned else set()
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in aligned_args and name not in constexprs}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return resources(compiled)


def resources(compiled):
    """{'registers', 'shared_bytes', 'spill_ops' (LDL+STL in SASS), 'mma' (instruction counts)} of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", cubin.name)
        sass = _tool("nvdisasm", "-c", cubin.name)
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL)\b", sass))
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "shared_bytes": compiled.metadata.shared,
            "spill_ops": ops["LDL"] + ops["STL"], "mma": {k: ops[k] for k in ("HGMMA", "HMMA") if ops[k]}}
