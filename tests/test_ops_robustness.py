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


def _edge_norm_inputs(dtype):
    """x [2, 4, 16] in dtype, keys_cls [3, 16], keys_img [4, 16]: token (0, 1) is zero and token (1, 2) has entries
    up to 6e4, representable in fp16 while its squared norm (about 1e10) overflows fp16."""
    g = torch.Generator().manual_seed(0)
    x, keys_cls, keys_img = (torch.randn(*shape, generator=g) for shape in ((2, 4, 16), (3, 16), (4, 16)))
    x[0, 1] = 0
    x[1, 2] = x[1, 2] / x[1, 2].abs().max() * 6e4
    return [t.to(DEVICE, dtype) for t in (x, keys_cls, keys_img)]


def _cosines_fp64(x, keys_cls, keys_img):
    normalize = torch.nn.functional.normalize
    return normalize(x.double(), dim=-1) @ normalize(torch.cat([keys_cls, keys_img]).double(), dim=-1).T


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_match_scores_of_zero_and_large_tokens_match_fp64(dtype):
    """Norms and cosines in fp32: a zero token scores 0 (norms clamped at 1e-12, as match_select), a token whose
    squared norm overflows fp16 gets its cosines; scores in x's dtype, the selection and the loss are fp64's."""
    from reference import match_prompts_ref

    inputs = _edge_norm_inputs(dtype)
    scores = tk.match_scores(*inputs)
    assert scores.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    ref_scores = _cosines_fp64(*inputs)
    torch.testing.assert_close(scores.double(), ref_scores, atol=atol, rtol=rtol)
    ref_mask, ref_loss = match_prompts_ref(*(t.double() for t in inputs), topk_cls=1, topk_img=2)
    entries = ref_mask.long() << torch.arange(7, device=DEVICE)  # one prompt per entry: the mask is the selection
    bits = topk_bits(scores, num_prefix_tokens=1, pool_cls=3, k_cls=1, k_img=2, backend="torch")
    assert torch.equal(bits, entries.sum(-1))
    torch.testing.assert_close(tk.matching_loss(scores, bits, 1, 1, 2).double(), ref_loss, atol=atol, rtol=rtol)
    for backend in BACKENDS:  # match_select computes in fp32 already: the public entry agrees with fp64 too
        mask, loss = tk.match_prompts(*inputs, topk_cls=1, topk_img=2, backend=backend)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=2e-4)


def test_match_scores_checks_its_arguments():
    x, keys_cls, keys_img = _match_inputs()
    with pytest.raises(ValueError, match=r"keys_img: expected shape \(pool >= 1, 32\) on cpu, got shape \(4, 31\)"):
        tk.match_scores(x.cpu(), keys_cls.cpu(), keys_img.cpu()[:, :31])
    with pytest.raises(ValueError, match=r"x: expected 3-d tensor, got shape \(5, 32\)"):
        tk.match_scores(x[0], keys_cls, keys_img)


def _words(counts_prefix, counts_patch, B=2, N=5):
    """Selection words for E = 7 entries: the prefix token sets its lowest counts_prefix bits, each patch token the
    counts_patch bits from entry 3 up."""
    return torch.tensor([[(1 << counts_prefix) - 1] + [((1 << counts_patch) - 1) << 3] * (N - 1)] * B)


@pytest.mark.parametrize("words, error", [
    pytest.param(_words(1, 3), "topk_cls: expected the number of entries that bits selects per prefix token (1), "
                 "got 2", id="topk_cls"),
    pytest.param(_words(2, 2), "topk_img: expected the number of entries that bits selects per patch token (2), "
                 "got 3", id="topk_img"),
    pytest.param(_words(2, 3).index_fill(1, torch.tensor([4]), 0b1111 << 3),  # the last patch token: 4 entries
                 "topk_img: expected the number of entries that bits selects per patch token (3 or 4), got 3",
                 id="uneven words"),
    pytest.param(_words(2, 3) | (1 << 7), "bits: expected words with bits 0..6 only (one per scores column), got the "
                 "word 0x83", id="bit 7 of 7 entries"),
    pytest.param(_words(2, 3) | (-2**63), "bits: expected words with bits 0..6 only (one per scores column), got the "
                 "word 0x8000000000000003", id="sign bit"),
])
def test_matching_loss_checks_the_words_against_topk(words, error):
    """Top-k values the words do not select (here topk_cls=2, topk_img=3) are refused, naming the argument, what the
    words select and the value given; bits outside the E entries are refused too. The arguments are left as they
    were."""
    args = _matching_loss_args() | dict(bits=words)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError) as info:
        tk.matching_loss(**args)
    assert error in str(info.value), str(info.value)
    assert all(torch.equal(args[name], t) for name, t in before.items())


def test_matching_loss_takes_words_of_the_given_topk():
    """Words that select topk_cls / topk_img entries pass the check, whatever the top-k of an empty token group; the
    loss is that of the unchecked model-path function, and 1 - the mean picked score against fp64."""
    from tcpa_kernels.ops.match_prompts import loss_from_words

    args = _matching_loss_args() | dict(bits=_words(2, 3))
    loss = tk.matching_loss(**args)
    assert torch.equal(loss, loss_from_words(**args))
    scores = args["scores"].double()
    torch.testing.assert_close(loss.double(), (1 - scores[:, :1, :2].mean()) + (1 - scores[:, 1:, 3:6].mean()))
    no_prefix = args | dict(bits=_words(3, 3, N=6)[:, 1:], num_prefix_tokens=0, topk_cls=7)
    torch.testing.assert_close(tk.matching_loss(**no_prefix).double(), 1 - scores[:, :, 3:6].mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["tcpa_attention", "tcpa_fused_attention", "tcpa_packed_attention"])
def test_head_dim_zero_is_refused(op, backend):
    """A head dim of 0 (the default scale 1/sqrt(D) divided by zero): a ValueError naming the argument and its shape,
    with or without a scale."""
    tensors, mask = attention_inputs(2, 2, 5, 4, 0)
    scores = torch.rand(2, 5, 4, device=DEVICE)
    calls = {"tcpa_attention": lambda **kw: tk.tcpa_attention(*tensors, mask, backend=backend, **kw),
             "tcpa_fused_attention": lambda **kw: tk.tcpa_fused_attention(*tensors, scores, pool_cls=2, topk_cls=1,
                                                                           topk_img=1, backend=backend, **kw),
             "tcpa_packed_attention": lambda **kw: tk.tcpa_packed_attention(
                 torch.randn(2, 5, 3, 2, 0, device=DEVICE), torch.randn(2, 2, 4, 0, device=DEVICE),
                 random_selection(2, 5, 4, 2, 1, 1), renormalize=False, backend=backend, **kw)}
    name, shape = ("qkv", r"\(2, 5, 3, 2, 0\)") if op == "tcpa_packed_attention" else ("q", r"\(2, 2, 5, 0\)")
    for kw in ({"scale": 0.5}, {} if op != "tcpa_packed_attention" else {"scale": 1.0}):
        with pytest.raises(ValueError, match=rf"{name}: expected shape .* head dim D >= 1, got shape {shape}"):
            calls[op](**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_attention_refuses_zero_heads(backend):
    """qkv [B, N, 3, 0, D] (output [B, N, 0]): refused with its shape, where the torch backward divided by zero."""
    qkv, prompt_kv = torch.randn(2, 5, 3, 0, 16, device=DEVICE), torch.randn(2, 0, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv: expected shape .* H >= 1 heads .* got shape \(2, 5, 3, 0, 16\)"):
        tk.tcpa_packed_attention(qkv, prompt_kv, random_selection(2, 5, 4, 2, 1, 1), scale=0.25, renormalize=False,
                                 backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["match_select", "match_prompts"])
def test_matching_refuses_an_empty_batch(op, backend):
    """B = 0 (the loss weights divide by B): a ValueError naming x and its shape, not a ZeroDivisionError."""
    x, keys_cls, keys_img = _match_inputs()
    with pytest.raises(ValueError, match=r"x: expected shape \[B, N, C\] with B >= 1 .* got shape \(0, 5, 32\)"):
        getattr(tk, op)(x[:0], keys_cls, keys_img, topk_cls=2, topk_img=2, backend=backend)
