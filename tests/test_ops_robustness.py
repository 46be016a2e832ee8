"""What the public ops refuse or guarantee at their edges: second-order gradients (an error, never silently wrong
ones; the pure-PyTorch matching loss has real ones), argument types and shapes, fp64 selection on the Triton path,
and what the Triton interpreter cannot compute."""

import math

import pytest
import torch

import tcpa_kernels as tk
from tcpa_kernels.ops.selection import topk_bits
from tests.conftest import DEVICE, TOLERANCE, attention_inputs, random_selection

BACKENDS = ["triton", "torch"]
# the tests' tensors reach the Triton interpreter only where there is no CUDA (DEVICE is "cpu")
on_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machine: the real kernels run")


def _attention(backend, dtype=torch.float32, **kw):
    tensors, mask = attention_inputs(2, 2, 5, 4, 16, dtype=dtype)
    return tensors, tk.tcpa_attention(*tensors, mask, backend=backend, **kw)


def _fused(backend, dtype=torch.float32, **kw):
    tensors, _ = attention_inputs(2, 2, 5, 4, 16, dtype=dtype)
    scores = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out, _ = tk.tcpa_fused_attention(*tensors, scores, pool_cls=2, topk_cls=1, topk_img=1, backend=backend, **kw)
    return tensors, out


def _packed(backend, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 16, generator=g).to(DEVICE, dtype).requires_grad_()
    prompt_kv = torch.randn(2, 2, 4, 16, generator=g).to(DEVICE).requires_grad_()
    kw = dict(scale=0.25, renormalize=False) | kw
    return (qkv, prompt_kv), tk.tcpa_packed_attention(qkv, prompt_kv, random_selection(2, 5, 4, 2, 1, 1),
                                                      backend=backend, **kw)


def _match_inputs(dtype=torch.float32):
    """x [2, 5, 32], keys_cls [3, 32], keys_img [4, 32]: leaves requiring grad."""
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 5, 32), (3, 32), (4, 32))
    return [torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_() for shape in shapes]


def _match_select(backend):
    inputs = _match_inputs()
    return inputs, tk.match_select(*inputs, topk_cls=2, topk_img=2, backend=backend)[1]


def _match_prompts(backend):
    inputs = _match_inputs()
    return inputs, tk.match_prompts(*inputs, topk_cls=2, topk_img=2, backend=backend)[1]


OPS = {"tcpa_attention": _attention, "tcpa_fused_attention": _fused, "tcpa_packed_attention": _packed,
       "match_select": _match_select, "match_prompts": _match_prompts}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_second_order_gradients_raise(op, backend):
    """A gradient penalty through an op with create_graph=True: an error, not a gradient that is silently constant.
    (match_prompts runs match_select, whose name the error gives.)"""
    inputs, out = OPS[op](backend)
    name = "match_select" if op == "match_prompts" else op
    with pytest.raises(RuntimeError, match=f"{name}: second-order gradients .* not supported"):
        torch.autograd.grad(out.square().sum(), inputs, create_graph=True)


def test_matching_loss_has_exact_second_order_gradients():
    """match_scores + matching_loss are plain PyTorch: gradcheck and gradgradcheck in fp64 (selection held fixed)."""
    g = torch.Generator().manual_seed(0)
    x, keys_cls, keys_img = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                             for shape in ((2, 4, 6), (2, 6), (3, 6)))
    bits = topk_bits(tk.match_scores(x, keys_cls, keys_img), num_prefix_tokens=1, pool_cls=2, k_cls=1, k_img=2,
                     backend="torch")
    loss = lambda x, kc, ki: tk.matching_loss(tk.match_scores(x, kc, ki), bits, 1, 1, 2)
    assert torch.autograd.gradcheck(loss, (x, keys_cls, keys_img))
    assert torch.autograd.gradgradcheck(loss, (x, keys_cls, keys_img))


def _matching_loss_args():
    scores = torch.rand(2, 5, 7)
    return dict(scores=scores, bits=torch.zeros(2, 5, dtype=torch.int64), num_prefix_tokens=1, topk_cls=2, topk_img=3)


@pytest.mark.parametrize("override, error, text", [
    pytest.param(dict(bits=torch.zeros(2, 5)), TypeError,
                 "bits: expected dtype in ['torch.int64'], got shape (2, 5), dtype torch.float32", id="float bits"),
    pytest.param(dict(bits=torch.zeros(2, 1, dtype=torch.int64)), ValueError,
                 "bits: expected int64 shape (2, 5) on cpu (as scores), got shape (2, 1)", id="bits shape"),
    pytest.param(dict(bits=torch.zeros(5, dtype=torch.int64)), ValueError,
                 "bits: expected 2-d tensor, got shape (5,)", id="bits 1-d"),
    pytest.param(dict(bits=torch.zeros(2, 5, dtype=torch.int64, device="meta")), ValueError,
                 "bits: expected int64 shape (2, 5) on cpu (as scores), got shape (2, 5), dtype torch.int64, device "
                 "meta", id="bits device"),
    pytest.param(dict(scores=torch.rand(2, 5)), ValueError, "scores: expected 3-d tensor, got shape (2, 5)",
                 id="scores 2-d"),
    pytest.param(dict(scores=torch.ones(2, 5, 7, dtype=torch.int64)), TypeError,
                 "scores: expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32', 'torch.float64'], "
                 "got shape (2, 5, 7), dtype torch.int64", id="int scores"),
    pytest.param(dict(scores=torch.rand(2, 5, 65)), ValueError,
                 "scores: expected shape (B, N, E) with 1 <= E <= 64 pool entries, got shape (2, 5, 65)",
                 id="65 entries"),
    pytest.param(dict(scores=[0.5]), TypeError, "scores: expected a torch.Tensor, got list", id="scores list"),
    pytest.param(dict(num_prefix_tokens=6), ValueError, "num_prefix_tokens: expected an int in [0, 5], got 6",
                 id="num_prefix_tokens"),
    pytest.param(dict(topk_cls=0), ValueError, "topk_cls: expected an int in [1, 7], got 0", id="topk_cls 0"),
    pytest.param(dict(topk_img=8), ValueError, "topk_img: expected an int in [1, 7], got 8", id="topk_img > E"),
    pytest.param(dict(topk_img=2.0), ValueError, "topk_img: expected an int in [1, 7], got 2.0 (float)",
                 id="float topk"),
    pytest.param(dict(topk_cls=True), ValueError, "topk_cls: expected an int in [1, 7], got True (bool)",
                 id="bool topk"),
])
def test_matching_loss_validates_its_arguments(override, error, text):
    with pytest.raises(error) as info:
        tk.matching_loss(**(_matching_loss_args() | override))
    assert text in str(info.value), str(info.value)


def test_matching_loss_on_valid_arguments():
    """The validated call computes the loss of the words it is given: 1 - the mean of the picked scores per group."""
    args = _matching_loss_args()
    args["bits"] = torch.tensor([[0b11] + [0b1110000] * 4] * 2)  # prefix: entries 0, 1; patches: 4, 5, 6
    scores = args["scores"]
    expected = (1 - scores[:, :1, :2].mean()) + (1 - scores[:, 1:, 4:].mean())
    torch.testing.assert_close(tk.matching_loss(**args), expected)


FLAG_CASES = [(dict(renormalize="False"), TypeError, r"renormalize: expected a bool \(True or False\), got 'False'"),
              (dict(renormalize=1), TypeError, r"renormalize: expected a bool .* got 1 \(int\)"),
              (dict(deterministic=None), TypeError, r"deterministic: expected a bool .* got None"),
              (dict(scale=0.0), ValueError, r"scale: expected a finite number in \(0.0, inf\), got 0.0"),
              (dict(scale=-0.25), ValueError, r"scale: expected a finite number in \(0.0, inf\), got -0.25"),
              (dict(scale=math.inf), ValueError, r"scale: .* got inf"),
              (dict(scale=math.nan), ValueError, r"scale: .* got nan"),
              (dict(scale="0.25"), ValueError, r"scale: .* got '0.25' \(str\)"),
              (dict(scale=True), ValueError, r"scale: .* got True \(bool\)")]


@pytest.mark.parametrize("op", ["tcpa_attention", "tcpa_fused_attention", "tcpa_packed_attention"])
@pytest.mark.parametrize("override, error, pattern", FLAG_CASES, ids=str)
def test_flags_and_scale_are_strict(op, override, error, pattern):
    """renormalize="False" would read as True through bool(): refused, as is any scale that is not a number > 0."""
    with pytest.raises(error, match=pattern):
        OPS[op]("torch", **override)


@pytest.mark.parametrize("op", ["tcpa_attention", "tcpa_fused_attention", "tcpa_packed_attention"])
def test_explicit_flags_and_integer_scale_are_taken(op):
    _, out = OPS[op]("torch", scale=1, renormalize=True, deterministic=False)
    _, expected = OPS[op]("torch", scale=1.0, renormalize=True, deterministic=True)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_scores_are_ranked_exactly(backend):
    """Scores that differ only below fp32's resolution: the triton backend picks what the torch backend picks (the
    fp32 kernel would see ties and take the lower index)."""
    scores = torch.tensor([[[1.0, 1.0 + 1e-12, 0.5, 0.0, 0.0, 0.0],  # prefix token: CLS pool = entries 0..2
                            [0.0, 0.0, 0.0, 1.0, 1.0 + 2e-12, 1.0 + 1e-12]]],  # patch token: image pool = 3..5
                          dtype=torch.float64, device=DEVICE)
    bits = topk_bits(scores, num_prefix_tokens=1, pool_cls=3, k_cls=1, k_img=2, backend=backend)
    assert bits.tolist() == [[0b10, 0b110000]]
    tensors, _ = attention_inputs(1, 1, 2, 6, 16)
    _, fused_bits = tk.tcpa_fused_attention(*tensors, scores, pool_cls=3, topk_cls=1, topk_img=2, backend=backend)
    assert torch.equal(fused_bits, bits)


@on_interpreter
@pytest.mark.parametrize("op", ["tcpa_attention", "tcpa_fused_attention", "tcpa_packed_attention"])
def test_interpreter_refuses_bf16_attention(op):
    """The interpreter's bf16 tl.dot is wrong (errors of order 1e8 on unit inputs): refused with a clear error."""
    with pytest.raises(TypeError, match="Triton interpreter, which computes bf16 dots wrongly.*backend='torch'"):
        OPS[op]("triton", dtype=torch.bfloat16)


@on_interpreter
def test_interpreter_runs_bf16_matching_like_the_torch_backend():
    """The matching kernels convert bf16 x and keys to fp32 before their dots: selection, loss terms and gradients
    agree with the torch backend to fp32 rounding (the gradients of x are then rounded to bf16 by both)."""
    inputs = _match_inputs(torch.bfloat16)
    results = {}
    for backend in BACKENDS:
        bits, terms = tk.match_select(*inputs, topk_cls=2, topk_img=2, backend=backend)
        results[backend] = bits, terms, torch.autograd.grad(terms.sum(), inputs)
    (bits, terms, grads), (ref_bits, ref_terms, ref_grads) = results["triton"], results["torch"]
    assert torch.equal(bits, ref_bits)
    torch.testing.assert_close(terms, ref_terms, atol=2e-5, rtol=2e-4)
    atol, rtol = TOLERANCE[torch.bfloat16]
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=atol * float(rg.abs().max()), rtol=rtol)
