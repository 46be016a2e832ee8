"""The kernels compile with Triton's real compiler for sm_90 (cubin), not only run in the interpreter, and at
ViT-shape arguments ptxas fits them in registers (no spills) at the library's launch configurations, the matching
kernels' and the prompt K/V kernels' dot products on tensor cores."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")


def test_every_kernel_variant_compiles_for_sm90():
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    script = [sys.executable, str(root / "tests" / "compile_sm90.py")]
    full = os.environ.get("TCPA_COMPILE_ALL") == "1"  # the whole matrix: ~15 minutes
    result = subprocess.run(script + (["--all"] if full else []), env=env, capture_output=True, text=True, timeout=1800)
    # the script fails on spills at ViT-shape arguments, on shared memory an sm_90 block cannot have and on matching
    # kernels without tensor-core instructions
    assert result.returncode == 0, result.stderr[-3000:]
    # attention launches per variant (fwd; bwd, atomic bwd, split bwd but for the 10 full-matrix variants of the bool
    # mask at head dim 128; fwd and bwd reading a prompt bank; the batch-group bwd of 16-bit head dim <= 64
    # variants), + top-k, + matching fwd and bwd, without and with the fused norm, fp32 and bf16 x, with and without
    # a bank of key sets, + the prompt K/V pass fwd and bwd, with and without the norm, fp32 and bf16, with and
    # without the prompt dropout
    assert result.stdout.count("'registers'") == (40 * 6 - 10 + 16 if full else 4 * 6 + 2) + 1 + 16 + 16
