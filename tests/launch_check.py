"""Run as a script with TRITON_INTERPRET=0 (tests/test_launch.py does): the project's direct launches hand each
compiled kernel's launcher what Triton's own dispatch hands it, with Triton's CUDA driver replaced by a stand-in
(``benchmarks/fake_driver.py``: kernels compiled for sm_90, nothing runs). Exits 1 with the differences otherwise.

For every launch of a TCPA train step (a two-block timm ViT, fwd + bwd, fp32 and fp16 autocast; a prompt bank of
two tasks with different pools, fp32): the launch through ``kernel[grid]`` and the direct one reach the same
compiled kernel's launcher with the same grid, stream, metadata and arguments (the very tensor objects; the direct
launch passes no launch metadata and no hooks, which Triton reads only when a hook is registered); with one input,
and one output, moved off 16-byte alignment, or one input in another dtype, both reach another compiled kernel, the
same one. A second step makes no call to Triton's dispatch. A registered launch hook sends launches through
Triton's dispatch, which hands the launcher its metadata and hooks."""

import os
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

from benchmarks import fake_driver, host  # noqa: E402

fake_driver.install(record=True)

import timm  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402

import tcpa_kernels as tk  # noqa: E402
from tcpa_kernels.ops import _attention_kernels, _launch, _match_kernels, _prompt_kv_kernels  # noqa: E402

LAUNCHING_MODULES = (_attention_kernels, _match_kernels, _prompt_kv_kernels)
# per kernel, an input whose dtype is not fixed by the launch plan: the prompt K/V (fp32 or the tokens' dtype),
# the CLS keys (parameters: fp32 whatever x's dtype); the prompt K/V pass's plans hold x's dtype, whose pointer
# type Triton specialises on all the same (its prompt tokens; the gradient)
DTYPE_PROBES = {"_fwd_kernel": 3, "_bwd_kernel": 3, "_match_fwd_kernel": 1, "_match_bwd_kernel": 1,
                "_kv_fwd_kernel": 0, "_kv_bwd_kernel": 0}
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def recorded_calls(step):
    """The ``launch`` calls of ``step()``: (kernel, grid, inputs, outputs, scalars, meta)."""
    calls = []

    def recording(*call):
        calls.append(call)
        _launch.launch(*call)

    for module in LAUNCHING_MODULES:
        module.launch = recording
    try:
        step()
    finally:
        for module in LAUNCHING_MODULES:
            module.launch = _launch.launch
    return calls


def launched(call, direct):
    """(launcher, arguments) of one launch of ``call``, through Triton's dispatch or direct (launched twice: the
    first may compile and fill the cache)."""
    _launch.DIRECT = direct
    try:
        for _ in range(1 if not direct else 2):
            _launch.launch(*call)
    finally:
        _launch.DIRECT = True
    return fake_driver.last_launch()


def same_arguments(a, b):
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def misaligned(t):
    """A tensor like t whose address is 4 bytes past a 16-byte boundary."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 4, dtype=t.dtype)
    return storage[1:].as_strided(t.shape, t.stride())


def compare(name, call):
    (jit_launcher, jit_args), (direct_launcher, direct_args) = launched(call, False), launched(call, True)
    check(direct_launcher is jit_launcher, f"{name}: another compiled kernel than Triton's dispatch picks")
    check(jit_args[:6] == direct_args[:6], f"{name}: grid, stream, function or metadata differ: "
                                           f"{jit_args[:6]} vs {direct_args[:6]}")
    check(direct_args[6:9] == (None, None, None), f"{name}: launch metadata or hooks passed: {direct_args[6:9]}")
    check(same_arguments(jit_args[9:], direct_args[9:]), f"{name}: the kernel's arguments differ")
    return jit_launcher


def check_step(label, step):
    step()  # compiles, fills the cache
    calls = recorded_calls(step)
    check(len(calls) > 0, f"{label}: no launch")
    dispatched = []
    run = triton.runtime.jit.JITFunction.run
    triton.runtime.jit.JITFunction.run = lambda self, *a, **k: dispatched.append(self) or run(self, *a, **k)
    try:
        step()
    finally:
        triton.runtime.jit.JITFunction.run = run
    check(not dispatched, f"{label}: {len(dispatched)} launches of a second step went through Triton's dispatch")
    for i, call in enumerate(calls):
        kernel, grid, inputs, outputs, scalars, meta = call
        name = f"{label} launch {i} ({kernel.__name__})"
        aligned = compare(name, call)
        for group, tensors in (("input", inputs), ("output", outputs)):  # the first floating-point one of each
            which = next(j for j, t in enumerate(tensors) if t is not None and t.dtype.is_floating_point)
            odd = misaligned(tensors[which])
            moved = tuple(odd if t is tensors[which] else t for t in tensors)  # where it repeats too
            moved_call = ((kernel, grid, moved, outputs, scalars, meta) if group == "input"
                          else (kernel, grid, inputs, moved, scalars, meta))
            other = compare(f"{name}, {group} {which} misaligned", moved_call)
            check(other is not aligned, f"{name}: {group} {which} misaligned reached the aligned kernel")
        which = DTYPE_PROBES[kernel.__name__]  # an input whose dtype the plan leaves open, in fp32 / fp16
        t = inputs[which]
        swapped = t.to(torch.float16 if t.dtype == torch.float32 else torch.float32)
        moved = tuple(swapped if u is t else u for u in inputs)  # where it repeats too
        other = compare(f"{name}, input {which} as {swapped.dtype}", (kernel, grid, moved, outputs, scalars, meta))
        check(other is not aligned, f"{name}: input {which} as {swapped.dtype} reached the {t.dtype} kernel")
    return calls


def train_step(model, images, dtype):
    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(images).float().logsumexp(-1).sum() + tk.get_matching_loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


def bank_step(folder, images):
    """A train step of a prompt bank of two tasks with different pools, a task per sample (the kernels' task and
    layout pointers)."""
    folders = {}
    for name, pools in (("a", dict(pool_size_cls=4, pool_size_img=6, topk_cls=2, topk_img=3)),
                        ("b", dict(pool_size_cls=3, pool_size_img=4, topk_cls=1, topk_img=2))):
        folders[name] = Path(folder) / name
        tk.save_pretrained(tk.apply_tcpa(vit(), backend="triton", **pools), folders[name])
    bank = tk.PromptBank(vit(), folders, backend="triton").train()
    tasks, labels = ["a", "b", "a"], torch.tensor([0, 1, 2])

    def step():
        bank.loss(bank(images, tasks), labels).backward()
        bank.zero_grad(set_to_none=True)

    return step


def main():
    torch.manual_seed(0)
    with host.kernels_stubbed(kernels=False):  # the CPU-only checks pass: the tensors stand in for device memory
        model = tk.apply_tcpa(vit(), pool_size_cls=4, pool_size_img=6, topk_cls=2, topk_img=3, backend="triton")
        images = torch.randn(3, 3, 32, 32)
        calls = check_step("fp32 step", train_step(model.train(), images, torch.float32))
        check_step("fp16 step", train_step(model, images, torch.float16))
        with tempfile.TemporaryDirectory() as folder:
            check_step("bank step", bank_step(folder, images))

        def hook(metadata):
            pass

        knobs.runtime.launch_enter_hook.add(hook)
        try:
            _launch.launch(*calls[0])
            args = fake_driver.last_launch()[1]
            check(args[6] is not None and args[7] is knobs.runtime.launch_enter_hook,
                  f"with a launch hook registered: expected Triton's launch metadata and hooks, got {args[6:9]}")
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    print(f"{len(calls)} launches per fp32 step compared", flush=True)
    if failures:
        print("\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
