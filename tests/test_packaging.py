"""Packaging: what ``import tcpa_kernels`` does to the process (nothing to the environment, no triton needed), and
what the wheel contains (the package only: no top-level ``reference``)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import read_configuration

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_INTERPRETER = """
import os
import timm, torch  # torch and timm may set variables of their own (timm imports triton through torchvision)
before = dict(os.environ)
import tcpa_kernels as tk
assert dict(os.environ) == before, "import tcpa_kernels changed the environment"
args = [torch.randn(1, 1, 4, 8)] * 3 + [torch.randn(1, 2, 8)] * 2 + [torch.ones(1, 4, 2, dtype=torch.bool)]
for interpret in ("unset", "set after triton was imported"):
    try:
        tk.tcpa_attention(*args, backend="triton")
    except ValueError as error:
        assert "backend='triton'" in str(error) and "TRITON_INTERPRET=1" in str(error), error
    else:
        raise AssertionError(f"backend='triton' on CPU ran with the interpreter {interpret}")
    os.environ["TRITON_INTERPRET"] = "1"
"""

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed: every import of it fails
import timm, torch
import tcpa_kernels as tk
model = timm.models.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
tk.apply_tcpa(model, pool_size_cls=4, pool_size_img=4, topk_cls=2, topk_img=2, backend="torch")
loss = model(torch.randn(2, 3, 16, 16)).square().mean() + tk.get_matching_loss(model)
loss.backward()
assert all(p.grad is not None and p.grad.isfinite().all() for p in tk.trainable_parameters(model))
args = [torch.randn(1, 1, 4, 8)] * 3 + [torch.randn(1, 2, 8)] * 2 + [torch.ones(1, 4, 2, dtype=torch.bool)]
assert tk.tcpa_attention(*args).shape == (1, 1, 4, 8)  # backend="auto"
try:
    tk.tcpa_attention(*args, backend="triton")
except ImportError as error:
    assert "backend='triton' needs the triton package, which is not installed" in str(error), error
else:
    raise AssertionError("backend='triton' ran without triton")
"""


@pytest.fixture(scope="module")
def subprocesses():
    """Both scripts started at once (each imports torch and timm: seconds), from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda code: subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    processes = {"without_interpreter": run(WITHOUT_INTERPRETER), "without_triton": run(WITHOUT_TRITON)}
    yield processes
    for process in processes.values():
        process.kill()
        process.communicate()


@pytest.mark.parametrize("script", ["without_interpreter", "without_triton"])
def test_import_in_a_fresh_process(subprocesses, script):
    """Without TRITON_INTERPRET: importing changes no environment variable, and backend='triton' on CPU tensors is a
    clear error. Without triton: the package imports, trains a small timm ViT on the torch backend, and
    backend='triton' says that triton is not installed."""
    output, _ = subprocesses[script].communicate(timeout=300)
    assert subprocesses[script].returncode == 0, output


def test_wheel_holds_the_package_only():
    config = read_configuration(ROOT / "pyproject.toml")
    packages = config["tool"]["setuptools"]["packages"]
    assert "tcpa_kernels" in packages and all(p.split(".")[0] == "tcpa_kernels" for p in packages), packages
    assert "triton>=3.6; sys_platform == 'linux'" in config["project"]["dependencies"]


def test_the_package_does_not_import_reference():
    """``reference`` is the tests' fp64 specification, not shipped: no module of the package may import it."""
    offenders = []
    for path in (ROOT / "tcpa_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.split(".")[0] == "reference"]
    assert not offenders, offenders


def test_readme_runnable_example_runs(tmp_path, monkeypatch):
    """README's adapter-folder example, the one it calls runnable as is, runs (in a scratch folder)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = text.split("(runnable as is, on a CPU):\n\n```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "my-adapter" / "prompt_config.json").is_file()
