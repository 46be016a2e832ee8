"""Measurement harness shared by ``benchmarks/`` and the profiling CLI (``python -m tcpa_kernels.profile``).

Time: ``time_ms`` on CUDA ``triton.testing.do_bench`` (median ms, CUDA-synchronised); on CPU the median of
``time.perf_counter`` over repetitions. Model comparisons (``measure_models``) time their methods in interleaved
rounds, one synchronised call of every method per round in rotating order, so that a burst of load on the machine
falls on all methods rather than on one, and report each figure's median with its spread (``summarize``).
Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on CPU,
where PyTorch keeps no allocator statistics, the bytes of tensors saved for backward that the call allocated (the
activation memory a training step holds; parameters and inputs it saves are left out as on CUDA), reported as such.

Op FLOPs (the formula ``tflops`` uses): forward 4*B*H*N*(N+P)*D (QK^T and PV), backward 2.5x forward
(five matmuls instead of two, the FlashAttention convention), forward+backward 3.5x forward.
Op bytes (the formula ``gbps`` uses), forward: q, k, v, out at B*H*N*D elements each, prompt K/V at
2*H*P*D, selection at 8*B*N (one word per token); backward: twice q/k/v/out plus dO, dq, dk, dv.
"""

import importlib.metadata
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tcpa_kernels as tk
from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._validate import MAX_POOL_ENTRIES
from tcpa_kernels.ops.selection import Selection, topk_bits

MODEL_METHODS = ("no_prompts", "vpt_deep", "tcpa_dense", "tcpa_fused")
# docs/how-it-works.md, 'Targets': ViT-B/16 attention at batch 128, pools of 18 + 18 prompts, each token picking 10
# entries
SPEC_OP_SHAPE = dict(B=128, H=12, N=197, P=36, D=64, topk=10)
# SDPA on the same P+N keys without a mask, pinned to one backend each (the §6 yardstick is flash)
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
OP_METHODS = ("tcpa_fused", *SDPA_BACKENDS, "sdpa_bool_mask", "dense_eager", "flex_attention", "torch_backend")
OP_MODES = ("fwd", "bwd", "fwd_bwd")


def _package_version(name):
    """The installed version of a distribution, without importing it; None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    """Device name, versions: stored next to every figure."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    return {"device": name, "torch": torch.__version__, "triton": _package_version("triton"),
            "python": platform.python_version(), "cuda": torch.version.cuda if device.type == "cuda" else None}


def device_slug(device):
    """The device name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", environment(device)["device"].lower()).strip("-")


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------- timing


def time_ms(fn, device, reps=10, warmup=2):
    """Median wall time of fn() in ms over at least ``reps`` calls after ``warmup`` (CUDA-synchronised)."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compilation and first-call allocations stay out of the estimate
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        once_ms = (time.perf_counter() - start) * 1e3
        # do_bench's budgets are milliseconds: enough for `warmup` and `reps` calls, and never under 25 / 100 ms
        return float(triton.testing.do_bench(fn, warmup=max(25.0, warmup * once_ms),
                                             rep=max(100.0, 1.5 * reps * once_ms), return_mode="median"))
    for _ in range(warmup):
        fn()
    return statistics.median([time_once(fn, device) for _ in range(reps)])


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one fn() call in ms (on CUDA synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_samples(steps: Mapping[str, Callable[[], object]], device: torch.device, reps: int,
                        timer: Callable[[Callable[[], object], torch.device], float] = time_once
                        ) -> dict[str, list[float]]:
    """``reps`` rounds; round r times every step once, starting at the (r mod n)-th of the n steps and wrapping
    around. Returns each step's times in round order: index r of every list is round r (paired samples)."""
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps if names else 0):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            samples[name].append(timer(steps[name], device))
    return samples


SPREAD_LIMIT = 0.10  # a figure whose IQR exceeds this fraction of its median is flagged as noisy


def summarize(samples: Sequence[float]) -> dict:
    """Median, min, max, quartiles (inclusive method: the 2nd and 4th of 5 sorted samples) and the spread as
    fractions of the median: ``iqr_rel`` = (q3 - q1) / median (compared with SPREAD_LIMIT: one outlying sample,
    which the median ignores, moves it little) and ``range_rel`` = (max - min) / median; the samples themselves."""
    median = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [median] * 3
    return {"median": median, "min": min(samples), "max": max(samples), "q1": q1, "q3": q3,
            "iqr_rel": ratio(q3 - q1, median), "range_rel": ratio(max(samples) - min(samples), median),
            "samples": list(samples)}


def noisy(figure: dict) -> bool:
    """Whether a ``summarize`` result spreads over SPREAD_LIMIT (IQR / median)."""
    return not figure["iqr_rel"] <= SPREAD_LIMIT


def peak_memory_mb(fn, device):
    """CUDA: peak allocated MB during fn() above the allocation before it. CPU: MB saved for backward."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    saved = {}  # storage address -> bytes

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with NewAllocations() as new, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for address, nbytes in saved.items() if address in new.addresses) / 2**20


class NewAllocations(TorchDispatchMode):
    """The tensors ops allocate while active: their storage addresses and the largest shape. Storages that existed
    before (parameters, inputs) are not among them, as CUDA's peak above the allocation before a call leaves
    them out; nor are views, in-place and out= results, which return their inputs' storage."""

    def __init__(self):
        super().__init__()
        self.addresses = set()
        self.largest = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.addresses.add(t.untyped_storage().data_ptr())
                if t.numel() > math.prod(self.largest):
                    self.largest = tuple(t.shape)
        return out


def memory_metric(device):
    return "cuda_peak_allocated_mb" if device.type == "cuda" else "cpu_saved_for_backward_mb"


# --------------------------------------------------------------------------------------------- models


def model_methods(model_name: str) -> tuple[str, ...]:
    """The MODEL_METHODS a timm model can run (its layout read on the meta device, no memory): the published
    dense-mask baseline exists for timm's pre-norm ``Block`` only. TypeError naming why for a model that cannot
    be prompted."""
    import timm

    from tcpa_kernels import dense_baseline
    from tcpa_kernels.vit import _check_model

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    _check_model(model)
    dense = dense_baseline.supports(model)
    return tuple(m for m in MODEL_METHODS if dense or m != "tcpa_dense")


def build_model(method, *, model_name, img_size, pool_size, topk, num_classes=100, device, backend="auto"):
    """A timm ViT without pretrained weights, prompted by ``method`` (one of MODEL_METHODS).

    VPT-deep gets the same number of prompt tokens as TCPA's two pools (2 * pool_size). ``no_prompts`` is the
    frozen ViT with a new head and a gradient required at the patch-embedding output, so the backward pass
    crosses every block as in prompt tuning.
    """
    import timm

    model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=num_classes)
    model = model.to(device).eval()
    if method == "no_prompts":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        model.patch_embed.register_forward_hook(lambda module, args, out: out.requires_grad_())
    elif method == "vpt_deep":
        tk.apply_vpt(model, num_prompts=2 * pool_size, deep=True)
    elif method in ("tcpa_dense", "tcpa_fused"):
        from tcpa_kernels.dense_baseline import apply_dense_tcpa

        apply = apply_dense_tcpa if method == "tcpa_dense" else tk.apply_tcpa
        apply(model, pool_size_cls=pool_size, pool_size_img=pool_size, topk_cls=topk, topk_img=topk, backend=backend)
    else:
        raise ValueError(f"method: expected one of {MODEL_METHODS}, got {method!r}")
    return model


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_step(model, images, labels, dtype):
    """One training step closure in train mode (prompt dropout on; a prompted backbone stays in eval): forward
    (+ matching loss for TCPA), backward, AdamW step. The closure sets the mode itself, so that it can alternate
    with an ``inference_step`` of the same model."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    prompted = hasattr(model, "prompt_state")

    def step():
        model.train()
        with _autocast(images.device, dtype):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            if prompted:
                loss = loss + 0.01 * tk.get_matching_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step(model, images, dtype):
    """One inference closure in eval mode (set by the closure), without autograd."""

    def step():
        model.eval()
        with torch.no_grad(), _autocast(images.device, dtype):
            model(images)

    return step


def measure_models(methods: Sequence[str], *, model_name: str, img_size: int, batch_size: int, pool_size: int,
                   topk: int, dtype: torch.dtype, device: torch.device, reps: int = 5) -> dict[str, dict]:
    """Train-step and inference time (ms) and training memory of prompted models on the same inputs.

    Every model is built and warmed up (optimizer state, one memory-measuring step, one inference) before any is
    timed; then ``interleaved_samples`` times the train steps, and the inference calls, in ``reps`` rounds. Per
    method: ``train_ms`` and ``inference_ms`` as ``summarize`` gives them, ``train_memory_mb`` (one figure: it
    does not vary between steps); a method that runs out of memory gets None figures and ``error``."""
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 100, (batch_size,), device=device)
    results = {method: {"train_ms": None, "train_memory_mb": None, "inference_ms": None} for method in methods}
    train, infer = {}, {}
    for method in methods:
        try:
            model = build_model(method, model_name=model_name, img_size=img_size, pool_size=pool_size, topk=topk,
                                device=device)
            train[method] = train_step(model, images, labels, dtype)
            infer[method] = inference_step(model, images, dtype)
            train[method]()  # allocates the optimizer state
            results[method]["train_memory_mb"] = peak_memory_mb(train[method], device)
            infer[method]()
        except torch.OutOfMemoryError:
            train.pop(method, None), infer.pop(method, None)
            results[method] |= {"train_memory_mb": None, "error": "out of memory"}
            torch.cuda.empty_cache()
    for key, steps in (("train_ms", train), ("inference_ms", infer)):
        for method, samples in interleaved_samples(steps, device, reps).items():
            results[method][key] = summarize(samples)
    model = train = infer = None  # the models go before the cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def measure_model(method: str, **setting) -> dict:
    """``measure_models`` of one method alone (no interleaving)."""
    return measure_models([method], **setting)[method]


# ------------------------------------------------------------------------------------------------ op


def op_flops(B, H, N, P, D, mode):
    forward = 4 * B * H * N * (N + P) * D
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def op_bytes(B, H, N, P, D, mode, element_size):
    forward = element_size * (4 * B * H * N * D + 2 * H * P * D) + 8 * B * N
    return forward * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode] + (
        element_size * 4 * B * H * N * D if mode != "fwd" else 0)


def op_pool_layout(P):
    """(entries per pool, prompt length) of P prompt tokens: two equal pools (CLS, image) of at most
    MAX_POOL_ENTRIES entries in all, each entry the shortest run of prompt tokens that allows it."""
    length = next((n for n in range(1, P + 1) if P % (2 * n) == 0 and P // n <= MAX_POOL_ENTRIES), None)
    if length is None:
        raise ValueError(f"P: expected an even number of prompt tokens, got {P}")
    return P // (2 * length), length


def op_inputs(B, H, N, P, D, dtype, device):
    """q/k/v [B,H,N,D], shared prompt K/V [H,P,D] (leaves needing grad), scores [B,N,E] (E pool entries)."""
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(H, P, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    scores = torch.rand(B, N, 2 * op_pool_layout(P)[0], device=device)
    return (q, k, v, pk, pv), scores


def op_selection(scores, P, topk):
    """The op benchmarks' selection: one CLS token, each token's ``topk`` entries (capped at the pool size) of
    its pool in op_pool_layout(P)."""
    pool, length = op_pool_layout(P)
    bits = topk_bits(scores, num_prefix_tokens=1, pool_cls=pool, k_cls=min(topk, pool), k_img=min(topk, pool),
                     backend=resolve_backend("auto", scores.device))
    return Selection(bits=bits, pool_cls=pool, len_cls=length, len_img=length)


def op_forward(method, tensors, scores, topk):
    """(forward closure, the leaves its backward differentiates) of one op method over the same inputs; each
    token selects its ``topk`` entries (capped at the pool size) of its pool. None for a method without an
    equivalent on this device. The baselines' keys and values [B, H, P+N, D] (prompts first) and masks are built
    here, once, outside the closure: what is timed is the attention alone."""
    q, k, v, pk, pv = tensors
    B, H, N, D = q.shape
    P = pk.shape[1]
    pool, length = op_pool_layout(P)
    topk = min(topk, pool)
    F = torch.nn.functional

    def full_kv():  # pre-built leaves, as a model that concatenated its prompts would hand them over
        return [torch.cat([p.detach().expand(B, -1, -1, -1), t.detach()], 2).requires_grad_(t.requires_grad)
                for p, t in ((pk, k), (pv, v))]

    def bool_mask():  # the selection as an SDPA/Flex mask [B, 1, N, P+N] (equivalent to renormalize=True)
        sel = op_selection(scores, P, topk).rows(0, N, P)
        return torch.cat([sel, sel.new_ones(B, N, N)], -1)[:, None]

    if method == "tcpa_fused":
        return (lambda: tk.tcpa_fused_attention(q, k, v, pk, pv, scores, pool_cls=pool, topk_cls=topk,
                                                topk_img=topk, prompt_len_cls=length, prompt_len_img=length)[0],
                tensors)
    if method in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[method]
        if q.device.type != "cuda" and backend != SDPBackend.FLASH_ATTENTION:  # CUDA-only backends
            return None
        kk, vv = full_kv()

        def pinned():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv)

        return pinned, (q, kk, vv)
    if method == "sdpa_bool_mask":
        mask, (kk, vv) = bool_mask(), full_kv()
        return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask), (q, kk, vv)
    if method == "dense_eager":  # the published code's attention: eager softmax, a float mask multiplied after it
        kk, vv = full_kv()
        dense = bool_mask().expand(B, H, N, N + P).to(q.dtype).contiguous()  # [B, H, N, P+N], as published
        return lambda: ((q * D**-0.5) @ kk.transpose(-1, -2)).softmax(-1).mul(dense) @ vv, (q, kk, vv)
    if method == "flex_attention":
        if q.device.type != "cuda" and q.requires_grad:  # FlexAttention has no backward on CPU
            return None
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        sel, (kk, vv) = bool_mask()[:, 0], full_kv()  # [B, N, P+N]
        block_mask = create_block_mask(lambda b, h, qi, ki: sel[b, qi, ki], B, None, N, N + P, device=q.device)
        flex = torch.compile(flex_attention)
        return lambda: flex(q, kk, vv, block_mask=block_mask), (q, kk, vv)
    if method == "torch_backend":  # the library's own PyTorch backend, on the same selection as a [B, N, P] mask
        mask = op_selection(scores, P, topk).rows(0, N, P)
        return lambda: tk.tcpa_attention(q, k, v, pk, pv, mask, backend="torch"), tensors
    raise ValueError(f"method: expected one of {OP_METHODS}, got {method!r}")


def op_step(forward, leaves, mode):
    """Closure timing ``mode`` of an op: forward only, backward only (graph kept), or both."""
    if mode == "fwd":
        return forward
    if mode == "fwd_bwd":
        def forward_backward():
            out = forward()
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

        return forward_backward
    out = forward()
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def make_op_step(method, mode, *, B, H, N, P, D, topk, dtype, device):
    """The closure running ``mode`` of op ``method`` on fresh inputs; None when it has no equivalent here."""
    tensors, scores = op_inputs(B, H, N, P, D, dtype, device)
    built = op_forward(method, tensors, scores, topk)
    return None if built is None else op_step(*built, mode)


def op_figures(ms, step, mode, *, B, H, N, P, D, dtype, device):
    """Median ms, TFLOP/s and GB/s (formulas in the module docstring) and the step's memory."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return {"ms": ms, "tflops": op_flops(B, H, N, P, D, mode) / (ms * 1e-3) / 1e12,
            "gbps": op_bytes(B, H, N, P, D, mode, element_size) / (ms * 1e-3) / 1e9,
            "memory_mb": peak_memory_mb(step, device)}


def ratio(a, b):
    return a / b if b else math.nan
