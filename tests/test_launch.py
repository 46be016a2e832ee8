"""The project's direct launches (``tcpa_kernels/ops/_launch.py``) hand each compiled kernel's launcher what
Triton's own dispatch hands it, in Triton's real (non-interpreted) runtime with a stand-in CUDA driver
(``tests/launch_check.py``, a subprocess: the interpreter must be off when triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")


def test_direct_launches_equal_tritons_dispatch():
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(root / "tests" / "launch_check.py")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # 2 blocks x (match, attention) x (fwd, bwd), + the prompt K/V pass (fwd, bwd)
    assert "10 launches per fp32 step compared" in result.stdout
