"""tcpa_attention (explicit mask): every backend vs the fp64 reference, output and all five gradients.

On CPU the "triton" backend runs the real kernels under TRITON_INTERPRET=1.
"""

import pytest
import torch

import tcpa_kernels as tk
from reference import tcpa_attention_ref
from tcpa_kernels.ops._function import shared_strides
from tcpa_kernels.ops.selection import Selection
from tcpa_kernels.ops.tcpa_attention import attention
from tests.conftest import DEVICE, assert_matches_reference, attention_inputs, fp64, random_selection

BACKENDS = ["triton", "torch"]
# (B, H, N, P, D): odd shapes on purpose (N=1, N=7, P=1, D=80, several query blocks)
# odd N/P/D; N a multiple of the key tile, so that prompt-only tail tiles follow (32, 40)
SHAPES = [(2, 2, 7, 5, 16), (1, 1, 1, 1, 32), (2, 1, 70, 3, 64), (1, 2, 9, 36, 80), (1, 1, 17, 66, 128),
          (1, 2, 32, 40, 16)]


def _check(backend, shape, dtype, renormalize, shared, mask_p=0.5, seed=0):
    tensors, mask = attention_inputs(*shape, dtype=dtype, shared=shared, seed=seed, mask_p=mask_p)
    ref_tensors = fp64(tensors)
    ref = tcpa_attention_ref(*ref_tensors, mask, renormalize=renormalize)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_tensors, grad_out)
    out = tk.tcpa_attention(*tensors, mask, renormalize=renormalize, backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, tensors, grad_out.to(dtype))
    assert_matches_reference(out, grads, ref, ref_grads, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_fp32_matches_reference(backend, shape, renormalize, shared, poison_buffers):
    _check(backend, shape, torch.float32, renormalize, shared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 2, 19, 6, 32), (1, 2, 70, 5, 128), (1, 1, 64, 70, 64)],
                         ids=str)  # both 16-bit LAUNCH_CONFIGS; token tiles, then two prompt-only tiles
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_fp16_matches_reference(backend, shape, renormalize, shared, poison_buffers):
    _check(backend, shape, torch.float16, renormalize, shared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_p", [0.0, 1.0], ids=["no_prompt_selected", "all_selected"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_empty_and_full_masks(backend, mask_p, renormalize):
    _check(backend, (2, 2, 11, 4, 16), torch.float32, renormalize, True, mask_p=mask_p)


def test_torch_backend_fp64_tight():
    _check("torch", (2, 2, 7, 5, 16), torch.float64, False, True)


def test_timm_style_strided_views_read_in_place():
    """q, k, v as views of one fused qkv tensor [B, N, 3, H, D] (timm's layout), not contiguous."""
    B, N, H, D, P = 2, 9, 2, 16, 4
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).permute(2, 0, 3, 1, 4).requires_grad_()
    pk, pv = torch.randn(2, H, P, D, device=DEVICE, requires_grad=True).unbind(0)
    mask = torch.rand(B, N, P, device=DEVICE) < 0.5
    for backend in BACKENDS:
        out = tk.tcpa_attention(*qkv.unbind(0), pk, pv, mask, backend=backend)
        ref = tcpa_attention_ref(*qkv.double().unbind(0), pk.double(), pv.double(), mask)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_prompt_views_read_in_place(backend, shared):
    """prompt K/V as the model path passes them to ``attention``: one [2, H, P, D] view of a [P, 2, H, D] tensor
    ([B, 2, H, P, D] of [B, P, 2, H, D]), unit stride on D only. No copy is made (``shared_strides`` keeps its
    halves), output and gradients equal those of ``tcpa_attention`` on contiguous copies, and the gradient of the
    stacked prompts is one tensor."""
    tensors, mask = attention_inputs(2, 2, 7, 5, 16, shared=shared)
    q, k, v, pk, pv = tensors
    rows = torch.stack([pk, pv], -4).movedim(-2, -4).detach().contiguous().requires_grad_()  # [(B,) P, 2, H, D]
    prompt_kv = rows.movedim(-4, -2)  # [(B,) 2, H, P, D]
    view_k, view_v = prompt_kv.unbind(-4)
    assert not view_k.is_contiguous() and shared_strides(view_k, view_v) == (view_k, view_v)
    out = attention(q, k, v, prompt_kv, Selection(mask=mask), 0.25, False, backend, True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, prompt_kv))
    ref = tk.tcpa_attention(*tensors, mask, scale=0.25, backend=backend)
    ref_grads = torch.autograd.grad(ref.square().sum(), tensors)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g, rg)
    torch.testing.assert_close(grads[3], torch.stack(ref_grads[3:], -4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unselected_prompt_gets_key_gradient_but_no_value_gradient(backend):
    tensors, mask = attention_inputs(1, 1, 5, 3, 16, shared=True)
    mask[:, :, 1] = False  # prompt 1 used by nobody
    for renormalize, key_grad_nonzero in ((False, True), (True, False)):
        out = tk.tcpa_attention(*tensors, mask, renormalize=renormalize, backend=backend)
        _, _, _, dpk, dpv = torch.autograd.grad(out.sum(), tensors)
        assert (dpv[:, 1] == 0).all()
        assert bool((dpk[:, 1] != 0).any()) == key_grad_nonzero


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_only_for_some_inputs(backend):
    tensors, mask = attention_inputs(1, 2, 6, 3, 16)
    q, k, v, pk, pv = tensors
    k.requires_grad_(False)
    pv.requires_grad_(False)
    out = tk.tcpa_attention(q, k, v, pk, pv, mask, backend=backend)
    dq, dv, dpk = torch.autograd.grad(out.sum(), (q, v, pk))
    ref_tensors = fp64(tensors)
    ref = tcpa_attention_ref(*ref_tensors, mask)
    rdq, rdv, rdpk = torch.autograd.grad(ref.sum(), (ref_tensors[0], ref_tensors[2], ref_tensors[3]))
    for g, rg in ((dq, rdq), (dv, rdv), (dpk, rdpk)):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


def test_atomic_and_deterministic_prompt_reductions_agree():
    tensors, mask = attention_inputs(3, 2, 10, 4, 16)
    grads = []
    for deterministic in (True, False):
        out = tk.tcpa_attention(*tensors, mask, backend="triton", deterministic=deterministic)
        grads.append(torch.autograd.grad(out.sum(), tensors[3:]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zero_batch():
    tensors, mask = attention_inputs(0, 2, 5, 3, 16)
    for backend in BACKENDS:
        out = tk.tcpa_attention(*tensors, mask, backend=backend)
        assert out.shape == (0, 2, 5, 16)
        grads = torch.autograd.grad(out.sum(), tensors)
        assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_selection_words_equal_their_mask(backend, renormalize):
    """A Selection (one int64 word per token and its pool layout, as TCPAPrompts passes it) computes what its
    [B, N, P] mask computes: output and every gradient."""
    tensors, _ = attention_inputs(2, 2, 9, 11, 16)
    selection = random_selection(2, 9, 11, 3, 2, 1)  # 3 CLS entries of 2 prompts, then 5 image entries
    results = []
    for prompt_mask in (selection, selection.rows(0, 9, 11)):
        out = tk.tcpa_attention(*tensors, prompt_mask, renormalize=renormalize, backend=backend)
        results.append((out, torch.autograd.grad(out.square().sum(), tensors)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=0, rtol=0)


class _GridRecorder:
    """Stands in for ``_bwd_kernel``: records each launch's grid and SPLIT, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((grid, meta["SPLIT"]))
            return self.kernel[grid](*args, **meta)

        return launch


def _pretend_sms(monkeypatch, sms):
    """The launchers and buffers see a device of ``sms`` SMs; returns the recorder of the backward launches."""
    from tcpa_kernels.ops import _attention_kernels, _function

    recorder = _GridRecorder(_attention_kernels._bwd_kernel)
    for module in (_attention_kernels, _function):
        monkeypatch.setattr(module, "sm_count", lambda device: sms)
    monkeypatch.setattr(_attention_kernels, "_bwd_kernel", recorder)
    _attention_kernels.forget_plans()
    return recorder


@pytest.fixture
def few_sms(monkeypatch):
    """A device of 3 SMs: a backward of fewer than 6 (batch, head)s splits its key tiles over programs; yields the
    recorder of the backward launches."""
    from tcpa_kernels.ops import _attention_kernels

    yield _pretend_sms(monkeypatch, 3)
    _attention_kernels.forget_plans()


@pytest.fixture
def one_sm(monkeypatch):
    """A device of 1 SM: a backward of at least 4 (batch, head)s walks several batch entries per program."""
    from tcpa_kernels.ops import _attention_kernels

    yield _pretend_sms(monkeypatch, 1)
    _attention_kernels.forget_plans()


def test_key_splits_rule():
    from tcpa_kernels.ops._attention_kernels import key_splits

    assert key_splits(96, 4, 132) == 3  # ViT-B/16 batch 8 on an H100: 288 programs, >= 2 per SM
    assert key_splits(1536, 4, 132) == 1  # batch 128: one program per (batch, head)
    assert key_splits(12, 4, 132) == 4  # batch 1: one key tile per program
    assert key_splits(4, 2, None) == 1  # off CUDA, unless told the SM count


@pytest.mark.parametrize("shape", [(1, 2, 70, 3, 64), (2, 1, 32, 40, 16), (1, 1, 17, 66, 40)], ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_backward_split_over_key_tiles_matches_reference(shape, renormalize, shared, few_sms, poison_buffers):
    _check("triton", shape, torch.float32, renormalize, shared)
    (grid, split), = few_sms.launches
    assert split and grid[0] > shape[0] * shape[1], "the key tiles were not split over programs"


def test_bool_mask_at_head_dim_128_keeps_one_program_per_head(few_sms):
    """The split variant of the bool-mask backward at head dims 65-128 spills on sm_90: not split, still right."""
    _check("triton", (1, 1, 17, 66, 128), torch.float32, False, True)
    (grid, split), = few_sms.launches
    assert not split and grid[0] == 1


def test_split_backward_equals_one_program_per_head_bitwise(monkeypatch):
    """dq of the split backward is the sum of the key tiles' accumulators in tile order: the same additions as one
    program walking every tile, so the same bits; the other gradients come from the same per-tile code. 3 heads,
    4 key tiles of 32 (fp32, D 32), 3 SMs: 2 programs per head, 2 tiles each."""
    from tcpa_kernels.ops import _attention_kernels

    assert _attention_kernels.key_splits(3, 4, 3) == 2
    tensors, mask = attention_inputs(1, 3, 100, 20, 32, shared=True)
    grads = []
    for sms in (None, 3):
        monkeypatch.setattr(_attention_kernels, "sm_count", lambda device, sms=sms: sms)
        _attention_kernels.forget_plans()
        out = tk.tcpa_attention(*tensors, mask, backend="triton")
        grads.append(torch.autograd.grad(out, tensors, torch.ones_like(out)))
    _attention_kernels.forget_plans()
    for one, split in zip(*grads):
        assert torch.equal(one, split)


@pytest.mark.parametrize("shape", [(5, 2, 70, 3, 64), (7, 1, 32, 40, 16)], ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_backward_walks_batch_groups_per_program(shape, renormalize, shared, one_sm, poison_buffers):
    """Many (batch, head)s for the SMs: each program walks a group of batch entries of one head and sums the shared
    prompts' gradient partial over its group (per-sample prompts keep one program per entry)."""
    from tcpa_kernels.ops._function import batch_group

    B, H, D = shape[0], shape[1], shape[4]
    _check("triton", shape, torch.float16, renormalize, shared)
    (grid, split), = one_sm.launches
    group = batch_group(B, H, D, torch.float16, 1) if shared else 1
    assert not split and grid[0] == -(-B // group) * H
    assert not shared or grid[0] < B * H, "the batch entries were not grouped"
