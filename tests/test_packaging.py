"""Packaging: what ``import tcpa_kernels`` does to the process (nothing to the environment, no triton needed), and
what the wheel contains (the package only: no top-level ``reference``)."""

import ast
import os
import re
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


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def python_blocks():
    """Every ```python block of README.md and docs/*.md: (page, line, code, reason it is not run or None). A block is
    not run only when the line right before it is a ``<!-- not run: <reason> -->`` comment."""
    blocks = []
    for page in DOC_PAGES:
        lines = page.read_text().split("\n")
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                marker = NOT_RUN.search(before)
                blocks.append((page.relative_to(ROOT).as_posix(), i + 1, "\n".join(lines[i + 1:end]),
                               marker and marker.group("reason")))
                i = end
            i += 1
    return blocks


BLOCKS = python_blocks()


def test_docs_have_python_blocks_that_run():
    """README's quickstart and the docs' examples are found, and most of them run."""
    assert any(page == "README.md" and reason is None for page, _, _, reason in BLOCKS)
    assert sum(reason is None for *_, reason in BLOCKS) >= 3, BLOCKS


@pytest.mark.parametrize("page, line, code, reason", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_doc_python_block_runs(page, line, code, reason, tmp_path, monkeypatch):
    """Every ```python block of README.md and docs/*.md runs as pasted on a CPU, in a scratch folder; a block that
    needs a GPU, a network or downloaded weights is marked ``<!-- not run: <reason> -->`` and skipped, saying why."""
    if reason is not None:
        assert reason, f"{page}:{line}: a 'not run' marker must say why"
        pytest.skip(f"{page}:{line}: not run: {reason}")
    monkeypatch.chdir(tmp_path)
    exec(compile("\n" * line + code, str(ROOT / page), "exec"), {"__name__": "__doc_example__"})


MD_REFERENCE = re.compile(r"(?<![\w./{}<>*$-])((?:\.\.?/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w-])")
SCANNED_SUFFIXES = {".py", ".md", ".sh", ".toml"}


def scanned_files():
    """The repository's *.py, *.md, *.sh and *.toml files, outside hidden folders, build outputs and runs/."""
    skip = {"runs", "build", "dist", "__pycache__", "node_modules"}
    for path in sorted(ROOT.rglob("*")):
        folders = path.relative_to(ROOT).parts[:-1]
        if (path.suffix in SCANNED_SUFFIXES and path.is_file()
                and not any(f in skip or f.startswith(".") or f.endswith(".egg-info") for f in folders)):
            yield path


def test_no_reference_to_a_missing_md_file():
    """A path ending in .md that a file names (a docstring's citation, a Markdown link) exists: relative to the
    repository root or to the naming file's folder; a bare file name may be any .md file of the repository (an
    output file's name, ``results.md``). Names built at run time (``{slug}.md``, ``<device>.md``) are not paths."""
    files = list(scanned_files())
    md_names = {path.name for path in files if path.suffix == ".md"}
    missing = []
    for path in files:
        for number, text in enumerate(path.read_text(errors="replace").split("\n"), 1):
            for match in MD_REFERENCE.finditer(text):
                ref = match.group(1)
                bare_name_of_a_page = "/" not in ref and ref in md_names
                if not ((ROOT / ref).is_file() or (path.parent / ref).is_file() or bare_name_of_a_page):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {ref}")
    assert len(files) > 50 and not missing, missing


def test_missing_md_reference_is_caught():
    """The scan above sees a citation of a file that is not there (the pattern, on a made-up line)."""
    not_here = "SPEC_NOT_HERE" + ".md"  # spelled in two parts, so that the scan of this file does not see it
    line = f'"""Attention ({not_here} §3), see docs/how-it-works.md and [x](../README.md#a)."""'
    assert [m.group(1) for m in MD_REFERENCE.finditer(line)] == [not_here, "docs/how-it-works.md", "../README.md"]
