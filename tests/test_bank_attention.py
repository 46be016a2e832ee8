"""Prompt banks in the attention ops: prompt K/V of T prompt sets ([T, 2, H, P, D], or [T, H, P, D] each) and a set
per sample (``Selection.tasks``). Every output and gradient equals fp64 attention in which each sample uses its own
set alone; the kernels read the sets in place (no per-sample copy)."""

import pytest
import torch

from reference import tcpa_attention_ref
from tcpa_kernels.ops import _attention_kernels, _torch_attention
from tcpa_kernels.ops.packed import tcpa_packed_attention
from tcpa_kernels.ops.selection import Selection
from tcpa_kernels.ops.tcpa_attention import tcpa_attention
from tests.conftest import DEVICE, assert_matches_reference, random_selection
from tests.test_attention import _pretend_sms

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


# Tasks whose own pools differ, (pool_cls, pool_img, k_cls, k_img, len_cls, len_img) each, inside padded pools of
# POOL_CLS CLS entries of one prompt and the image entries of LEN_IMG prompts after them (P_PAD prompts); task 1's
# image entries have one prompt (the first of each padded entry), task 2 has every prompt.
LAYOUTS = [(1, 3, 1, 2, 1, 2), (2, 1, 2, 1, 1, 1), (2, 3, 1, 3, 1, 2)]
POOL_CLS, LEN_IMG, P_PAD = 2, 2, 8


def _live_prompts(task):
    """The prompt indices task ``task`` has: its CLS entries' prompts, then its image entries' first tokens."""
    pool_cls, pool_img, _, _, _, len_img = LAYOUTS[task]
    return [*range(pool_cls), *(POOL_CLS + e * LEN_IMG + o for e in range(pool_img) for o in range(len_img))]


def _live_bits(tasks):
    """int64 [B, 1]: the entries each sample's task has."""
    words = [((1 << LAYOUTS[t][0]) - 1) | (((1 << LAYOUTS[t][1]) - 1) << POOL_CLS) for t in tasks.tolist()]
    return torch.tensor(words, device=DEVICE)[:, None]


def _layout_inputs(backend, order, seed=0, dtype=None, layouts_dtype=torch.int64, n=N):
    """As ``_inputs`` (n tokens) with a bank [T, 2, H, P_PAD, D] of padded pools: the selection has tasks and
    layouts (each sample's task's), and its words set bits of the sample's own entries only."""
    dtype = dtype or (torch.float64 if backend == "torch" else torch.float32)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, n, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    bank = torch.randn(T, 2, H, P_PAD, D, generator=g).to(DEVICE, dtype).requires_grad_()
    selection = random_selection(B, n, P_PAD, POOL_CLS, 1, LEN_IMG, seed=seed)
    selection.tasks = torch.tensor(ORDERS[order], dtype=torch.int32, device=DEVICE)
    selection.layouts = torch.tensor([LAYOUTS[t] for t in ORDERS[order]], dtype=layouts_dtype, device=DEVICE)
    selection.bits &= _live_bits(selection.tasks)
    return qkv, bank, selection, torch.randn(B, n, H * D, generator=g).to(DEVICE, dtype)


def _layout_reference(qkv, bank, selection, renormalize, grad_out):
    """fp64 out [B, H, N, D], each sample attending over its task's set with only the prompts it has (indexed out:
    the others are in neither its normaliser nor its output), and the gradients of (qkv, bank)."""
    ref_qkv, ref_bank = (t.detach().double().requires_grad_() for t in (qkv, bank))
    q, k, v = ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rows = Selection(bits=selection.bits, pool_cls=POOL_CLS, len_img=LEN_IMG).rows(0, qkv.shape[1], P_PAD)
    outs = []
    for b, t in enumerate(selection.tasks.tolist()):
        live = _live_prompts(t)
        prompt_k, prompt_v = ref_bank[t, :, :, live].unbind(0)  # [H, p, D] each
        outs.append(tcpa_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], prompt_k[None], prompt_v[None],
                                       rows[b:b + 1, :, live], scale=D**-0.5, renormalize=renormalize))
    out = torch.cat(outs)
    return out, torch.autograd.grad(out, (ref_qkv, ref_bank), _heads(grad_out).double(), materialize_grads=True)


def _assert_dead_prompts_get_no_gradient(dbank):
    """A set's prompts its task does not have are dead for every sample using it: exactly zero gradient."""
    for t in range(T):
        dead = sorted(set(range(P_PAD)) - set(_live_prompts(t)))
        assert not dbank[t, ..., dead, :].any(), f"set {t}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_packed_bank_layouts_match_each_task_alone(backend, order, renormalize, poison_buffers):
    """Tasks with pools of different sizes padded to the largest (``Selection.layouts``, prompt length 2 in the
    image pool): output and every gradient equal each sample attending over its own prompts only (fp64 reference;
    with renormalize=False the prompts it lacks are not in its normaliser either); their gradient is exactly 0."""
    qkv, bank, selection, grad_out = _layout_inputs(backend, order)
    out = tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=renormalize, backend=backend)
    dqkv, dbank = torch.autograd.grad(out, (qkv, bank), grad_out)
    ref, ref_grads = _layout_reference(qkv, bank, selection, renormalize, grad_out)
    assert_matches_reference(_heads(out), (dqkv, dbank), ref, ref_grads, qkv.dtype, names=("qkv", "bank"))
    _assert_dead_prompts_get_no_gradient(dbank)
    for t in set(range(T)) - set(ORDERS[order]):  # sets no sample uses
        assert not dbank[t].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_bank_layouts_over_several_key_tiles(backend, renormalize, monkeypatch, poison_buffers):
    """40 tokens: the Triton kernels' prompts follow a full tile of tokens, and the backward splits the key tiles
    over programs (a device of 8 SMs for the B*H = 8 heads); the torch backend walks query chunks of 3 rows."""
    if backend == "triton":
        recorder = _pretend_sms(monkeypatch, 8)
    else:
        monkeypatch.setattr(_torch_attention, "CHUNK_ELEMENTS", 3 * B * H * (40 + P_PAD))
    try:
        qkv, bank, selection, grad_out = _layout_inputs(backend, "mixed", seed=4, n=40)
        out = tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=renormalize, backend=backend)
        dqkv, dbank = torch.autograd.grad(out, (qkv, bank), grad_out)
    finally:
        _attention_kernels.forget_plans()
    if backend == "triton":
        (grid, split), = recorder.launches
        assert split and grid[0] > B * H, "the key tiles were not split over programs"
    ref, ref_grads = _layout_reference(qkv, bank, selection, renormalize, grad_out)
    assert_matches_reference(_heads(out), (dqkv, dbank), ref, ref_grads, qkv.dtype, names=("qkv", "bank"))
    _assert_dead_prompts_get_no_gradient(dbank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_bits_of_prompts_a_sample_lacks_are_ignored(backend, renormalize, poison_buffers):
    """Selection words with bits set on entries outside a sample's own pools give the same output and gradients as
    the words without them."""
    qkv, bank, selection, grad_out = _layout_inputs(backend, "mixed", seed=3, layouts_dtype=torch.int32)
    dead = ~_live_bits(selection.tasks) & ((1 << (POOL_CLS + (P_PAD - POOL_CLS) // LEN_IMG)) - 1)
    assert dead.any()
    results = []
    for bits in (selection.bits, selection.bits | dead):
        sel = Selection(bits=bits, pool_cls=POOL_CLS, len_img=LEN_IMG, tasks=selection.tasks,
                        layouts=selection.layouts)
        out = tcpa_packed_attention(qkv, bank, sel, scale=D**-0.5, renormalize=renormalize, backend=backend)
        results.append((out, *torch.autograd.grad(out, (qkv, bank), grad_out)))
    for name, clean, dirty in zip(("out", "dqkv", "dbank"), *results):
        assert torch.equal(clean, dirty), name


@pytest.mark.parametrize("renormalize", [False, True])
def test_fp16_packed_bank_layouts_in_the_kernels(renormalize, poison_buffers):
    """The 16-bit kernel variants read per-sample layouts too."""
    qkv, bank, selection, grad_out = _layout_inputs("triton", "mixed", seed=2, dtype=torch.float16,
                                                    layouts_dtype=torch.int32)
    out = tcpa_packed_attention(qkv, bank, selection, scale=D**-0.5, renormalize=renormalize, backend="triton")
    dqkv, dbank = torch.autograd.grad(out, (qkv, bank), grad_out)
    ref, ref_grads = _layout_reference(qkv, bank, selection, renormalize, grad_out)
    assert_matches_reference(_heads(out), (dqkv, dbank), ref, ref_grads, torch.float16, names=("qkv", "bank"))
    _assert_dead_prompts_get_no_gradient(dbank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_prompt_banks_with_layouts_match_each_task_alone(backend, poison_buffers):
    """The [B, H, N, D] entry with prompt_k and prompt_v banks [T, H, P, D] each and per-sample layouts."""
    qkv, bank, selection, grad_out = _layout_inputs(backend, "mixed", seed=1, layouts_dtype=torch.int32)
    prompt_k, prompt_v = (t.detach().clone().requires_grad_() for t in bank.unbind(1))
    out = tcpa_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), prompt_k, prompt_v, selection, scale=D**-0.5,
                         backend=backend)
    grads = torch.autograd.grad(out, (qkv, prompt_k, prompt_v), _heads(grad_out))
    ref, (ref_dqkv, ref_dbank) = _layout_reference(qkv, bank, selection, False, grad_out)
    assert_matches_reference(out, grads, ref, (ref_dqkv, *ref_dbank.unbind(1)), qkv.dtype,
                             names=("qkv", "prompt_k", "prompt_v"))
    _assert_dead_prompts_get_no_gradient(torch.stack(grads[1:], dim=1))


def test_bank_layouts_argument_errors():
    qkv, bank, selection, _ = _layout_inputs("torch", "mixed")

    def call(layouts=selection.layouts, mask=None):
        sel = Selection(mask=mask, bits=None if mask is not None else selection.bits, pool_cls=POOL_CLS,
                        len_img=LEN_IMG, tasks=selection.tasks, layouts=layouts)
        tcpa_packed_attention(qkv, bank, sel, scale=0.25, renormalize=False, backend="torch")

    def edited(column, value):
        out = selection.layouts.clone()
        out[1, column] = value  # sample 1: task 0's (1, 3, 1, 2, 1, 2)
        return out

    mask = Selection(bits=selection.bits, pool_cls=POOL_CLS, len_img=LEN_IMG).rows(0, N, P_PAD)
    with pytest.raises(ValueError, match=r"selection.layouts: per-sample pool layouts come with selection words"):
        call(mask=mask)
    with pytest.raises(ValueError, match=r"selection.layouts: expected each sample's pool_cls in \[1, 2\], "
                                         r"got \[2, 3\]"):
        call(edited(0, 3))  # a pool larger than the padded one
    with pytest.raises(ValueError, match=r"selection.layouts: expected each sample's pool_img in \[1, 3\], "
                                         r"got \[1, 4\]"):
        call(edited(1, 4))
    with pytest.raises(ValueError, match=r"selection.layouts: expected each sample's k_cls in \[1, 2\], at most its "
                                         r"pool, got \[1, 2\]"):
        call(edited(2, 2))  # k_cls 2 of its CLS pool of 1
    with pytest.raises(ValueError, match=r"selection.layouts: expected each sample's len_img in \[1, 2\], "
                                         r"got \[1, 3\]"):
        call(edited(5, 3))  # entries longer than the padded ones
    with pytest.raises(ValueError, match=r"selection.layouts: expected int32/int64 shape \(4, 6\)"):
        call(selection.layouts[:2])
    with pytest.raises(TypeError, match=r"selection.layouts: expected dtype"):
        call(selection.layouts.float())
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    sel = Selection(bits=selection.bits, pool_cls=POOL_CLS, len_img=LEN_IMG, tasks=selection.tasks,
                    layouts=edited(1, 4))
    with pytest.raises(ValueError, match=r"selection.layouts: expected each sample's pool_img in \[1, 3\]"):
        tcpa_attention(q, k, v, *bank.unbind(1), sel, backend="torch")
