"""Prompt banks in the attention ops: prompt K/V of T prompt sets ([T, 2, H, P, D], or [T, H, P, D] each) and a set
per sample (``Selection.tasks``). Every output and gradient equals fp64 attention in which each sample uses its own
set alone; the kernels read the sets in place (no per-sample copy)."""

import pytest
import torch

from reference import tcpa_attention_ref
from tcpa_kernels.ops import _attention_kernels
from tcpa_kernels.ops.packed import tcpa_packed_attention
from tcpa_kernels.ops.selection import Selection
from tcpa_kernels.ops.tcpa_attention import tcpa_attention
from tests.conftest import DEVICE, assert_matches_reference, random_selection

BACKENDS = ["triton", "torch"]
B, N, H, P, D, T = 4, 7, 2, 5, 16, 3
ORDERS = {"mixed": [2, 0, 2, 1], "sorted": [0, 0, 1, 2], "single": [1, 1, 1, 1]}


def _heads(x):
    """[B, N, H*D] -> [B, H, N, D] view."""
    return x.unflatten(-1, (H, -1)).transpose(1, 2)


def _inputs(backend, order, seed=0, dtype=None):
    """(qkv [B, N, 3, H, D], bank [T, 2, H, P, D], both leaves requiring grad; a selection with tasks; grad_out),
    in ``dtype`` (default: fp64 on the torch backend, fp32 on the Triton one)."""
    dtype = dtype or (torch.float64 if backend == "torch" else torch.float32)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    bank = torch.randn(T, 2, H, P, D, generator=g).to(DEVICE, dtype).requires_grad_()
    selection = random_selection(B, N, P, 2, 1, 1)
    selection.tasks = torch.tensor(ORDERS[order], dtype=torch.int32, device=DEVICE)
    return qkv, bank, selection, torch.randn(B, N, H * D, generator=g).to(DEVICE, dtype)


def _reference(qkv, bank, selection, renormalize, grad_out):
    """fp64 out [B, H, N, D] with each sample's own set gathered, and the gradients of (qkv, bank): indexing's
    backward sums each set's samples."""
    ref_qkv, ref_bank = (t.detach().double().requires_grad_() for t in (qkv, bank))
    per_sample = ref_bank[selection.tasks.long()]  # [B, 2, H, P, D]
    out = tcpa_attention_ref(*ref_qkv.permute(2, 0, 3, 1, 4).unbind(0), *per_sample.unbind(1),
                             selection.rows(0, N, P), scale=D**-0.5, renormalize=renormalize)
    return out, torch.autograd.grad(out, (ref_qkv, ref_bank), _heads(grad_out).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_packed_bank_matches_each_set_alone(backend, order, renormalize, poison_buffers):
    qkv, bank, selection, grad_out = _inputs(backend, order)
    out = tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=renormalize, backend=backend)
    dqkv, dbank = torch.autograd.grad(out, (qkv, bank), grad_out)
    assert dbank.shape == bank.shape
    ref, ref_grads = _reference(qkv, bank, selection, renormalize, grad_out)
    assert_matches_reference(_heads(out), (dqkv, dbank), ref, ref_grads, qkv.dtype, names=("qkv", "bank"))
    if order == "single":  # sets no sample uses get a zero gradient
        assert not dbank[[0, 2]].any()


@pytest.mark.parametrize("renormalize", [False, True])
def test_fp16_packed_bank_in_the_kernels(renormalize, poison_buffers):
    """The 16-bit kernel variants read a bank too (the interpreter's fp16 dots are right; bf16 is GPU-only)."""
    qkv, bank, selection, grad_out = _inputs("triton", "mixed", seed=2, dtype=torch.float16)
    out = tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=renormalize, backend="triton")
    dqkv, dbank = torch.autograd.grad(out, (qkv, bank), grad_out)
    ref, ref_grads = _reference(qkv, bank, selection, renormalize, grad_out)
    assert_matches_reference(_heads(out), (dqkv, dbank), ref, ref_grads, torch.float16, names=("qkv", "bank"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_prompt_banks_match_each_set_alone(backend, poison_buffers):
    """The [B, H, N, D] entry with prompt_k and prompt_v banks [T, H, P, D] each."""
    qkv, bank, selection, grad_out = _inputs(backend, "mixed", seed=1)
    prompt_k, prompt_v = (t.detach().clone().requires_grad_() for t in bank.unbind(1))
    out = tcpa_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), prompt_k, prompt_v, selection, backend=backend)
    grads = torch.autograd.grad(out, (qkv, prompt_k, prompt_v), _heads(grad_out))
    ref, (ref_dqkv, ref_dbank) = _reference(qkv, bank, selection, False, grad_out)
    assert_matches_reference(out, (grads[0], *grads[1:]), ref, (ref_dqkv, *ref_dbank.unbind(1)), qkv.dtype,
                             names=("qkv", "prompt_k", "prompt_v"))


def test_kernels_read_the_bank_in_place(monkeypatch):
    """The Triton launchers allocate nothing of a per-sample prompt K/V's size ([B, 2, H, P, D]) in the forward:
    each program reads its sample's set through the task index."""
    sizes = []
    empty = torch.empty

    def recording(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(_attention_kernels.torch, "empty", recording)
    qkv, bank, selection, _ = _inputs("triton", "mixed")
    with torch.no_grad():
        tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=False, backend="triton")
    assert sizes and max(sizes) < B * 2 * H * P * D


def test_bank_argument_errors():
    qkv, bank, selection, _ = _inputs("torch", "mixed")

    def call(prompt_kv=bank, tasks=selection.tasks):
        tcpa_packed_attention(qkv, prompt_kv, Selection(bits=selection.bits, pool_cls=2, tasks=tasks), scale=0.25,
                              renormalize=False, backend="torch")

    with pytest.raises(ValueError, match=r"selection.tasks: expected values in \[0, 3\) .*got \[0, 3\]"):
        call(tasks=torch.tensor([0, 3, 1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="selection.tasks: expected dtype"):
        call(tasks=selection.tasks.float())
    with pytest.raises(ValueError, match=r"selection.tasks: expected int32/int64 shape \(4,\)"):
        call(tasks=selection.tasks[:2])
    with pytest.raises(ValueError, match=r"prompt_kv: expected shape .*\[T, 2, H, P, D\] with selection.tasks"):
        call(prompt_kv=bank[0])
