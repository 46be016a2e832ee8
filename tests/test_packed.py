"""tcpa_packed_attention (timm's [B, N, 3, H, D] qkv layout) vs the fp64 reference: output, the gradient of qkv
(one contiguous [B, N, 3, H, D] buffer) and of prompt_kv. Also: no layout copies around the op, one custom op per
kernel launch, torch.compile(fullgraph=True), opcheck of every attention op, argument errors.

On CPU the "triton" backend runs the real kernels under TRITON_INTERPRET=1.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reference import tcpa_attention_ref
from tcpa_kernels.ops._function import attention_bwd, attention_fwd
from tcpa_kernels.ops.packed import (
    packed_attention,
    packed_attention_bwd,
    packed_attention_fwd,
    tcpa_packed_attention,
)
from tcpa_kernels.ops.selection import Selection
from tests.conftest import DEVICE, assert_matches_reference, random_selection, requires_cuda

BACKENDS = ["triton", "torch"]
# (B, N, H, P, D), selection layout (pool_cls, len_cls, len_img): odd N and D, B=1, N=1, several prompt blocks
SHAPES = [((2, 7, 2, 5, 16), (2, 1, 1)), ((1, 1, 2, 3, 32), (1, 1, 2)), ((2, 13, 1, 36, 80), (18, 1, 1))]
FP16_SHAPE = ((2, 13, 2, 6, 32), (2, 2, 1))


def _heads(x, H):
    """[B, N, H*D] -> [B, H, N, D] view."""
    return x.unflatten(-1, (H, -1)).transpose(1, 2)


def _qkv(B, N, H, D, dtype, layout, g):
    """[B, N, 3, H, D] view of a leaf that requires grad: timm's qkv output [B, N, 3*C] ("timm"), rows padded so N
    is not 3*C apart ("strided"), a non-unit stride on D ("d_strided", copied by the op), or q, k, v interleaved
    per head ("interleaved": [B, N, H, 3, D] transposed, k not a whole number of head strides after q: copied
    unless H is 1)."""
    width = 3 * H * D
    if layout == "d_strided":
        leaf = torch.randn(B, N, 3, H, D, 2, generator=g).to(DEVICE, dtype).requires_grad_()
        return leaf[..., 0]
    if layout == "interleaved":
        return torch.randn(B, N, H, 3, D, generator=g).to(DEVICE, dtype).requires_grad_().transpose(2, 3)
    leaf = torch.randn(B, N, width + (8 if layout == "strided" else 0), generator=g).to(DEVICE, dtype)
    return leaf.requires_grad_()[..., :width].view(B, N, 3, H, D)


def _reference(qkv, prompt_kv, mask, scale, renormalize, grad_out):
    """fp64 output [B, H, N, D] and gradients of (qkv, prompt_kv) for grad_out [B, H, N, D]."""
    ref_qkv, ref_prompt_kv = (t.detach().double().requires_grad_() for t in (qkv, prompt_kv))
    out = tcpa_attention_ref(*ref_qkv.permute(2, 0, 3, 1, 4).unbind(0), *ref_prompt_kv.unbind(-4), mask,
                             scale=scale, renormalize=renormalize)
    return out, torch.autograd.grad(out, (ref_qkv, ref_prompt_kv), grad_out.double())


def _check(backend, shape, layout, dtype, renormalize, shared, *, prompt_dtype=None, qkv_layout="timm",
           deterministic=True, mask_mode=False):
    B, N, H, P, D = shape
    prompt_dtype = prompt_dtype or dtype
    g = torch.Generator().manual_seed(0)
    qkv = _qkv(B, N, H, D, dtype, qkv_layout, g)
    prompt_kv = torch.randn(*((2, H) if shared else (B, 2, H)), P, D, generator=g)
    prompt_kv = prompt_kv.to(DEVICE, prompt_dtype).requires_grad_()
    selection = random_selection(B, N, P, *layout)
    if mask_mode:  # the same selection as a bool mask [B, N, P]
        selection = Selection(mask=selection.rows(0, N, P))
    scale = D**-0.5
    out = tcpa_packed_attention(qkv, prompt_kv, selection, scale=scale, renormalize=renormalize, backend=backend,
                                deterministic=deterministic)
    assert out.shape == (B, N, H * D) and out.dtype == dtype and out.is_contiguous()
    grad_out = torch.randn(B, N, H * D, generator=g).to(DEVICE, dtype)
    dqkv, dprompt = torch.autograd.grad(out, (qkv, prompt_kv), grad_out)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()
    assert dprompt.shape == prompt_kv.shape and dprompt.dtype == prompt_dtype
    ref, ref_grads = _reference(qkv, prompt_kv, selection.rows(0, N, P), scale, renormalize, _heads(grad_out, H))
    assert_matches_reference(_heads(out, H), (dqkv, dprompt), ref, ref_grads, dtype, names=("qkv", "prompt_kv"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_fp32_matches_reference(backend, shape, layout, renormalize, shared, poison_buffers):
    _check(backend, shape, layout, torch.float32, renormalize, shared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt_dtype", [torch.float16, torch.float32], ids=["fp16_prompts", "fp32_prompts"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_fp16_matches_reference(backend, prompt_dtype, renormalize, shared, poison_buffers):
    _check(backend, *FP16_SHAPE, torch.float16, renormalize, shared, prompt_dtype=prompt_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qkv_layout", ["strided", "d_strided", "interleaved"])
def test_strided_qkv(backend, qkv_layout, poison_buffers):
    _check(backend, *SHAPES[0], torch.float32, False, True, qkv_layout=qkv_layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_head_interleaved_qkv(backend, poison_buffers):
    """With one head the head stride is never applied, so q, k, v any distance apart are read through qkv's one
    pointer: no copy, and the result of the reference."""
    (B, N, H, P, D), layout = SHAPES[2]
    qkv = _qkv(B, N, H, D, torch.float32, "interleaved", torch.Generator().manual_seed(0))
    with _OpLog() as log:
        packed_attention(qkv, torch.randn(2, H, P, D, device=DEVICE), random_selection(B, N, P, *layout), D**-0.5,
                         False, backend, True)
    assert not [op for op, _ in log.ops if op in (torch.ops.aten.clone, torch.ops.aten.copy_)]
    _check(backend, (B, N, H, P, D), layout, torch.float32, False, True, qkv_layout="interleaved")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_mask_selection(backend, renormalize, poison_buffers):
    _check(backend, *SHAPES[2], torch.float32, renormalize, False, mask_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("renormalize", [False, True])
def test_atomic_prompt_gradients_match_reference(dtype, renormalize, poison_buffers):
    _check("triton", (3, 9, 2, 5, 16), (2, 1, 1), dtype, renormalize, True, prompt_dtype=torch.float32,
           deterministic=False)


def test_torch_backend_fp64():
    _check("torch", *SHAPES[0], torch.float64, False, False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("batch", [4, 128])
def test_bf16_vit_b_shape(batch, renormalize, deterministic, shared, poison_buffers):
    """ViT-B/16 attention (N=197, H=12, D=64) under autocast on timm's qkv view: bf16 qkv, fp32 prompts,
    published pools (18+18), at batch 4 and at the targets' batch 128 (docs/how-it-works.md, 'Targets'); output buffers
    poisoned with NaN."""
    _check("triton", (batch, 197, 12, 36, 64), (18, 1, 1), torch.bfloat16, renormalize, shared,
           prompt_dtype=torch.float32, deterministic=deterministic)


class _OpLog(TorchDispatchMode):
    """Every op dispatched while active, with the largest numel among its tensor outputs (custom ops are seen
    as one op: what runs inside them is not dispatched through this mode)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket, max(sizes, default=0)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_no_layout_copies_and_one_op_per_launch(backend, shared):
    """Forward + backward dispatch no stack/cat/clone/copy/cast as large as qkv's C-wide part, and exactly one
    forward and the backward custom op; the gradient of timm's [B, N, 3*C] output is a view of the packed one."""
    B, N, H, P, D = 2, 9, 2, 4, 16
    leaf = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    prompt_kv = torch.randn(*((2, H) if shared else (B, 2, H)), P, D, device=DEVICE, requires_grad=True)
    selection = random_selection(B, N, P, 2, 1, 1)
    grad_out = torch.randn(B, N, H * D, device=DEVICE)
    with _OpLog() as log:
        out = tcpa_packed_attention(leaf.view(B, N, 3, H, D), prompt_kv, selection, scale=0.25, renormalize=False,
                                    backend=backend)
        dleaf, _ = torch.autograd.grad(out, (leaf, prompt_kv), grad_out)
    aten = torch.ops.aten
    copies = {aten.stack, aten.cat, aten.clone, aten._to_copy, aten.copy_}  # .contiguous() dispatches clone
    large = [(op, n) for op, n in log.ops if op in copies and n >= B * N * H * D]
    assert not large, large
    custom = [str(op) for op, _ in log.ops if str(op).startswith("tcpa_kernels.")]
    assert sorted(custom) == ["tcpa_kernels.packed_attention_bwd", "tcpa_kernels.packed_attention_fwd"]
    assert dleaf.shape == leaf.shape and dleaf.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_dispatcher(backend):
    """In eager mode the autograd Function calls the launchers itself (a custom op's dispatch costs more host time
    than its launch): the profiler sees no tcpa_kernels op. Under a dispatch mode it sees each (the test above)."""
    qkv = torch.randn(2, 5, 3, 2, 16, device=DEVICE, requires_grad=True)
    prompt_kv = torch.randn(2, 2, 4, 16, device=DEVICE, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = packed_attention(qkv, prompt_kv, random_selection(2, 5, 4, 2, 1, 1), 0.25, False, backend, True)
        torch.autograd.grad(out.sum(), (qkv, prompt_kv))
    names = {event.name for event in prof.events()}
    assert "aten::empty" in names and not [name for name in names if name.startswith("tcpa_kernels::")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_prompt_kv_views_read_in_place(backend, shared):
    """prompt_kv as the model path passes it to ``packed_attention``: [2, H, P, D] permuted from a [P, 2, H, D]
    tensor ([B, 2, H, P, D] from [B, P, 2, H, D]), unit stride on D only. No copy is made, and output and gradients
    equal those of the validated op on a contiguous copy."""
    B, N, H, P, D = 2, 7, 2, 5, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE).requires_grad_()
    rows = torch.randn(*(() if shared else (B,)), P, 2, H, D, generator=g).to(DEVICE).requires_grad_()
    view = rows.movedim(-4, -2)  # [2, H, P, D] or [B, 2, H, P, D]
    assert not view.is_contiguous() and view.stride(-1) == 1
    selection = random_selection(B, N, P, 2, 1, 1)
    args = (selection, 0.25, False, backend, True)
    with _OpLog() as log:
        packed_attention(qkv, view, *args)
    copies = {torch.ops.aten.clone, torch.ops.aten._to_copy, torch.ops.aten.copy_}
    assert not [op for op, _ in log.ops if op in copies]
    out = packed_attention(qkv, view, *args)
    grads = torch.autograd.grad(out.square().sum(), (qkv, rows))
    contiguous = view.detach().contiguous().requires_grad_()
    ref = tcpa_packed_attention(qkv, contiguous, selection, scale=0.25, renormalize=False, backend=backend)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qkv, contiguous))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1].movedim(-2, -4))  # [..., 2, H, P, D] -> [..., P, 2, H, D]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    B, N, H, P, D = 2, 7, 2, 5, 16
    selection = random_selection(B, N, P, 2, 1, 1)

    def step(leaf, prompt_kv, bits):
        sel = Selection(bits=bits, pool_cls=2)
        return tcpa_packed_attention(leaf.view(B, N, 3, H, D), prompt_kv, sel, scale=0.25, renormalize=False,
                                     backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaf = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    prompt_kv = torch.randn(2, H, P, D, device=DEVICE, requires_grad=True)
    results = []
    for fn in (step, compiled):
        out = fn(leaf, prompt_kv, selection.bits)
        results.append((out, *torch.autograd.grad(out.square().sum(), (leaf, prompt_kv))))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Every attention custom op at a small shape, packed and [B, H, N, D] layouts (separate and stacked prompt K/V),
    both prompt-gradient shapes. The ops have no autograd formula (the autograd Functions around them have it):
    inputs that need no gradient."""
    B, N, H, P, D = 2, 5, 2, 4, 16
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE)
    sel = random_selection(B, N, P, 2, 1, 1).op_args()
    dqkv = torch.empty(B, N, 3, H, D, device=DEVICE)
    dprompts = (torch.empty(B, 2, H, P, D, device=DEVICE), torch.zeros(2, H, P, D, device=DEVICE))
    shared = torch.randn(2, H, P, D, device=DEVICE)
    for prompt_kv in (shared, torch.randn(B, 2, H, P, D, device=DEVICE)):
        torch.library.opcheck(packed_attention_fwd.overload, (qkv, prompt_kv, *sel, 0.25, False, backend))
        out, lse = packed_attention_fwd(qkv, prompt_kv, *sel, 0.25, False, backend)
        for dprompt in dprompts[:2 if prompt_kv.dim() == 4 else 1]:
            torch.library.opcheck(packed_attention_bwd.overload, (dqkv, dprompt, torch.randn_like(out), qkv,
                                                                  prompt_kv, out, lse, *sel, 0.25, False, backend))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.rand(B, N, P, device=DEVICE) < 0.5
    for prompts in (shared.unbind(0), (shared, None)):  # separate [H, P, D], stacked [2, H, P, D]
        torch.library.opcheck(attention_fwd.overload, (q, k, v, *prompts, mask, None, None, None, 0, 1, 1, 0.25,
                                                       True, backend))
        out, lse = attention_fwd(q, k, v, *prompts, *sel, 0.25, False, backend)
        for dprompt in dprompts:
            torch.library.opcheck(attention_bwd.overload, (dq, dk, dv, dprompt, torch.randn_like(out), q, k, v,
                                                           *prompts, out, lse, *sel, 0.25, False, backend))


def small_packed_call(B, P, backend):
    """qkv [B, 5, 3, 2, 16] and prompt_kv [2, 2, P, 16] (leaves requiring grad) and the op's output on them."""
    qkv = torch.randn(B, 5, 3, 2, 16, device=DEVICE, requires_grad=True)
    prompt_kv = torch.randn(2, 2, P, 16, device=DEVICE, requires_grad=True)
    out = tcpa_packed_attention(qkv, prompt_kv, random_selection(B, 5, P, 1, 1, 1), scale=0.25, renormalize=False,
                                backend=backend)
    return qkv, prompt_kv, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch(backend):
    qkv, prompt_kv, out = small_packed_call(0, 3, backend)
    assert out.shape == (0, 5, 32)
    dqkv, dprompt = torch.autograd.grad(out.sum(), (qkv, prompt_kv))
    assert dqkv.shape == qkv.shape and torch.equal(dprompt, torch.zeros_like(prompt_kv))


def test_argument_errors():
    B, N, H, P, D = 2, 5, 2, 4, 16
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE)
    prompt_kv = torch.randn(2, H, P, D, device=DEVICE)
    selection = random_selection(B, N, P, 2, 1, 1)
    call = lambda qkv=qkv, prompt_kv=prompt_kv, selection=selection, backend="torch": tcpa_packed_attention(
        qkv, prompt_kv, selection, scale=0.25, renormalize=False, backend=backend)
    with pytest.raises(ValueError, match="backend: expected 'triton' or 'torch' .* got 'auto'"):
        call(backend="auto")
    with pytest.raises(ValueError, match=r"qkv: expected shape \[B, N, 3, H, D\], got shape \(2, 5, 2, 2, 16\)"):
        call(qkv=qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"prompt_kv: expected shape \(2, 2, 'P >= 1', 16\) .* got shape \(2, 2, 4, 8"):
        call(prompt_kv=prompt_kv[..., :8])
    with pytest.raises(TypeError, match=r"prompt_kv: expected dtype in \['torch.float32', 'torch.float16'\]"):
        call(qkv=qkv.half(), prompt_kv=prompt_kv.bfloat16())
    with pytest.raises(ValueError, match=r"selection.bits: expected int64 shape \(2, 5\) .* got shape \(2, 4\)"):
        call(selection=Selection(bits=selection.bits[:, :4], pool_cls=2))
    with pytest.raises(ValueError, match="selection: expected a pool layout of P=4 prompts .* pool_cls=5"):
        call(selection=Selection(bits=selection.bits, pool_cls=5))
    with pytest.raises(TypeError, match="selection: expected a tcpa_kernels.ops.selection.Selection, got Tensor"):
        call(selection=selection.bits)
    with pytest.raises(ValueError, match=r"qkv: head dim must be <= 128 for backend='triton'"):
        tcpa_packed_attention(torch.randn(1, 3, 3, 1, 160, device=DEVICE), torch.randn(2, 1, 2, 160, device=DEVICE),
                              random_selection(1, 3, 2, 1, 1, 1), scale=0.1, renormalize=False, backend="triton")
