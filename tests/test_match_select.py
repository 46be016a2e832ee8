"""match_select (matching + top-k + loss terms in one op) vs the fp64 reference: selection, loss, every gradient.

Inputs are built so that every token's cosines are well separated (keys orthogonal, x a distinct mix of them plus
noise): the top-k is then the same in fp32 and fp64, and the comparison tests the arithmetic, not tie luck.
"""

import pytest
import torch

import tcpa_kernels as tk
from reference import match_prompts_ref
from reference.matching import topk_entries
from tcpa_kernels.ops import _match_kernels
from tcpa_kernels.ops import match_select as match_select_module
from tcpa_kernels.ops.match_select import match_bwd, match_fwd, match_select, norm_match_select
from tcpa_kernels.ops.selection import entry_selection
from tests.conftest import DEVICE, TOLERANCE, _PoisonedTorch, requires_cuda

BACKENDS = ["triton", "torch"]
# (B, N, C, pool_cls, pool_img, topk_cls, topk_img, num_prefix)
CONFIGS = [
    (2, 9, 70, 5, 7, 2, 3, 1),
    (1, 13, 64, 3, 6, 3, 6, 2),  # k = pool size, two prefix tokens
    (2, 6, 48, 18, 18, 10, 10, 1),  # published pools
    (1, 5, 40, 2, 30, 1, 1, 0),  # no prefix token, k = 1
    (1, 3, 80, 32, 32, 5, 7, 1),  # 64 entries: bit 63 in use
    (3, 1, 33, 4, 4, 2, 2, 1),  # only the prefix token
]


def separated_inputs(B, N, C, pool_cls, pool_img, dtype=torch.float32, seed=0):
    """x [B, N, C], keys_cls [Pc, C], keys_img [Pi, C] (leaves requiring grad) whose cosines differ by >= ~1e-2."""
    g = torch.Generator().manual_seed(seed)
    E = pool_cls + pool_img
    basis, _ = torch.linalg.qr(torch.randn(C, E, generator=g, dtype=torch.float64))  # [C, E] orthonormal columns
    keys = basis.T * (0.5 + torch.rand(E, 1, generator=g, dtype=torch.float64))  # [E, C]
    mix = torch.stack([torch.randperm(E, generator=g) for _ in range(B * N)]).view(B, N, E).double() / E
    x = mix @ basis.T + 0.2 * torch.randn(B, N, C, generator=g, dtype=torch.float64) / C**0.5
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (x, keys[:pool_cls], keys[pool_cls:])]


def reference_terms(x, keys_cls, keys_img, topk_cls, topk_img, num_prefix):
    """fp64 [B, N] loss terms from the reference's cosines and top-k rule."""
    B, N, _ = x.shape
    xn = torch.nn.functional.normalize(x, dim=-1)
    terms = x.new_zeros(B, N)
    for tokens, keys, k in ((slice(0, num_prefix), keys_cls, topk_cls), (slice(num_prefix, N), keys_img, topk_img)):
        cos = xn[:, tokens] @ torch.nn.functional.normalize(keys, dim=-1).T  # [B, n, pool]
        if cos.numel():
            sel = topk_entries(cos, k)
            terms[:, tokens] = torch.where(sel, 1 - cos, 0).sum(-1) / (B * cos.shape[1] * k)
    return terms


@pytest.fixture
def poison_match_buffers(monkeypatch):
    for module in (match_select_module, _match_kernels):  # the torch twin's buffers and the launchers'
        monkeypatch.setattr(module, "torch", _PoisonedTorch())


def check_against_reference(config, dtype, backend):
    """Selection, loss terms and the gradients of x and both pools' keys for a general upstream gradient."""
    B, N, C, pc, pi, kc, ki, npre = config
    inputs = separated_inputs(B, N, C, pc, pi, dtype)
    bits, terms = match_select(*inputs, topk_cls=kc, topk_img=ki, num_prefix_tokens=npre, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_mask, ref_loss = match_prompts_ref(*ref_inputs, topk_cls=kc, topk_img=ki, num_prefix_tokens=npre)
    ref_terms = reference_terms(*ref_inputs, kc, ki, npre)
    assert torch.equal(entry_selection(bits, pc + pi), ref_mask), "selection differs from the reference"
    atol, rtol = TOLERANCE[torch.float32]  # cosines are computed in fp32 from the (rounded) inputs
    torch.testing.assert_close(terms.double(), ref_terms, atol=atol, rtol=rtol)
    torch.testing.assert_close(terms.sum().double(), ref_loss, atol=atol, rtol=rtol)
    dterms = torch.randn(B, N, dtype=torch.float64, device=DEVICE)  # a general upstream gradient, not only sum()
    grads = torch.autograd.grad(terms, inputs, dterms.to(terms.dtype))
    ref_grads = torch.autograd.grad(ref_terms, ref_inputs, dterms, materialize_grads=True)  # unused pool: zeros
    atol, rtol = TOLERANCE[dtype]
    for name, g, rg in zip(("x", "keys_cls", "keys_img"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        torch.testing.assert_close(g.double(), rg, atol=atol * float(rg.abs().max()), rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_select_matches_reference(backend, config, dtype, poison_match_buffers):
    check_against_reference(config, dtype, backend)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vit_b_layer(dtype):
    """The compiled kernels at a ViT-B/16 layer (N=197, C=768, pools 18+18, k 10) with more token blocks than
    backward programs, x in fp32 (the residual stream) or bf16."""
    check_against_reference((96, 197, 768, 18, 18, 10, 10, 1), dtype, "triton")


@pytest.fixture
def forget_plans():
    """Launch plans read LAUNCH and MAX_KEY_PARTIALS when they are made: none made from a test's patched values
    outlives it (request before monkeypatch: torn down after its undo)."""
    yield _match_kernels.forget_plans
    _match_kernels.forget_plans()


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_gradient_partials_accumulate_over_blocks(backend, forget_plans, monkeypatch):
    """More token blocks than backward programs: each program adds its later blocks to its own partial."""
    monkeypatch.setattr(_match_kernels, "MAX_KEY_PARTIALS", 2)
    monkeypatch.setitem(_match_kernels.LAUNCH, "bwd", _match_kernels.LAUNCH["bwd"] | dict(BLOCK_T=16))
    forget_plans()
    inputs = separated_inputs(3, 29, 48, 4, 6)
    _, terms = match_select(*inputs, topk_cls=2, topk_img=3, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(terms.sum(), inputs)
    ref_grads = torch.autograd.grad(reference_terms(*ref_inputs, 2, 3, 1).sum(), ref_inputs)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=2e-5 * float(rg.abs().max()), rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_needed_gradients(backend):
    x, kc, ki = separated_inputs(2, 7, 32, 3, 4)
    x.requires_grad_(False)
    _, terms = match_select(x, kc, ki, topk_cls=2, topk_img=2, backend=backend)
    dkc, dki = torch.autograd.grad(terms.sum(), (kc, ki))
    assert dkc.abs().sum() > 0 and dki.abs().sum() > 0
    x.requires_grad_(True)
    kc.requires_grad_(False)
    ki.requires_grad_(False)
    _, terms = match_select(x, kc, ki, topk_cls=2, topk_img=2, backend=backend)
    (dx,) = torch.autograd.grad(terms.sum(), (x,))
    assert dx.shape == x.shape and dx.abs().sum() > 0


def test_backends_agree_in_float64_and_fp32():
    inputs = separated_inputs(2, 11, 40, 6, 9)
    bits_t, terms_t = match_select(*inputs, topk_cls=3, topk_img=4, backend="triton")
    bits_r, terms_r = match_select(*[t.double() for t in inputs], topk_cls=3, topk_img=4, backend="torch")
    assert terms_r.dtype == torch.float64
    assert torch.equal(bits_t, bits_r)
    torch.testing.assert_close(terms_t.double(), terms_r, atol=1e-7, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_finite_scores_select_k_of_their_own_pool(backend):
    """A NaN or zero token still selects exactly k entries of its own pool, never a bit of the other pool."""
    x, kc, ki = separated_inputs(2, 6, 32, 5, 7)
    x = x.detach().clone()
    x[0, 0] = float("nan")  # prefix token
    x[0, 3] = float("nan")  # patch token
    x[1, 2, :5] = float("inf")
    x[1, 4] = 0.0  # all cosines 0: ties everywhere
    bits, _ = match_select(x, kc, ki, topk_cls=2, topk_img=3, backend=backend)
    sel = entry_selection(bits, 12)
    assert (sel[:, :1, :5].sum(-1) == 2).all() and (sel[:, 1:, 5:].sum(-1) == 3).all()
    assert not sel[:, :1, 5:].any() and not sel[:, 1:, :5].any()
    # NaN scores rank lowest and ties go to the lower index: the lowest entries of the pool
    assert bits[0, 0] == 0b11 and bits[0, 3] == 0b111 << 5 and bits[1, 4] == 0b111 << 5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_backends_agree_on_nonfinite_rows():
    x, kc, ki = separated_inputs(2, 6, 32, 5, 7)
    x = x.detach().clone()
    x[0, ::2] = float("nan")
    x[1, 1, 3] = float("-inf")
    bits = [match_select(x, kc, ki, topk_cls=2, topk_img=3, backend=b)[0] for b in BACKENDS]
    assert torch.equal(*bits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_matching(backend):
    inputs = separated_inputs(2, 7, 32, 3, 4)
    expected = match_select(*inputs, topk_cls=2, topk_img=2, backend=backend)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = match_select(*inputs, topk_cls=2, topk_img=2, backend=backend)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[1].dtype == torch.float32


def test_match_prompts_is_match_select_with_a_mask():
    inputs = separated_inputs(2, 9, 40, 4, 5)
    mask, loss = tk.match_prompts(*inputs, topk_cls=2, topk_img=3, prompt_len_cls=2, prompt_len_img=1)
    ref_mask, ref_loss = match_prompts_ref(*[t.detach().double() for t in inputs], topk_cls=2, topk_img=3,
                                           prompt_len_cls=2, prompt_len_img=1)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    """The ops have no autograd formula (MatchSelect, the autograd Function around them, has it): inputs that need
    no gradient."""
    x, kc, ki = (t.detach() for t in separated_inputs(2, 5, 32, 3, 4))
    weight, bias = torch.rand(32) + 0.5, torch.randn(32)
    for norm in ((None, None, 0.0, False), (weight, bias, 1e-6, True), (None, None, 1e-5, True)):
        torch.library.opcheck(match_fwd.overload, (x, kc, ki, None, None, *norm, 1, 2, 2, backend))
    _, bits, h, mean, rstd = match_fwd(x, kc, ki, None, None, weight, bias, 1e-6, True, 1, 2, 2, backend)
    dterms, dh = torch.randn(2, 5), torch.randn_like(h)
    for dh_, stats in ((dh, (weight, mean, rstd)), (None, (None, mean[:0], rstd[:0]))):
        for dres in (None, torch.randn_like(x)):
            torch.library.opcheck(match_bwd.overload, (dterms, dh_, dres, x, kc, ki, None, None, bits, *stats, 1, 2,
                                                       2, True, True, backend))
    banks, tasks = (torch.stack([keys, keys.flip(0)]) for keys in (kc, ki)), torch.tensor([1, 0], dtype=torch.int32)
    bank_cls, bank_img = banks  # two key sets, a set per sample
    for layouts in (None, torch.tensor([[2, 4, 1, 2, 1, 1], [3, 3, 2, 1, 1, 1]])):  # with layouts: its own pools
        torch.library.opcheck(match_fwd.overload, (x, bank_cls, bank_img, tasks, layouts, weight, bias, 1e-6, True,
                                                   1, 2, 2, backend))
        torch.library.opcheck(match_bwd.overload, (dterms, dh, None, x, bank_cls, bank_img, tasks, layouts, bits,
                                                   weight, mean, rstd, 1, 2, 2, True, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_adds_the_residual_gradient(backend):
    """``match_bwd``'s dres (a block's gradient around its attention, added by the matching backward itself): dx
    is dx without it plus dres, in fp32 to the bit; the key gradients do not change; without dx, dres is unused."""
    x, kc, ki = (t.detach() for t in separated_inputs(2, 5, 32, 3, 4))
    weight, bias = torch.rand(32) + 0.5, torch.randn(32)
    _, bits, h, mean, rstd = match_fwd(x, kc, ki, None, None, weight, bias, 1e-6, True, 1, 2, 2, backend)
    dterms, dh, dres = torch.randn(2, 5), torch.randn_like(h), torch.randn_like(x)
    args = (x, kc, ki, None, None, bits, weight, mean, rstd, 1, 2, 2)
    dx, partials = match_bwd(dterms, dh, None, *args, True, True, backend)
    dx_res, partials_res = match_bwd(dterms, dh, dres, *args, True, True, backend)
    torch.testing.assert_close(dx_res, dx + dres, atol=0, rtol=0)
    torch.testing.assert_close(partials_res, partials, atol=0, rtol=0)
    no_dx, keys_only = match_bwd(dterms, dh, dres, *args, False, True, backend)
    assert no_dx.numel() == 0
    torch.testing.assert_close(keys_only, partials, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_fused_with_matching(backend, dtype, affine, poison_match_buffers):
    """norm_match_select = (LayerNorm(x), match_select(x)) in one op: h, selection, terms and the gradients of x
    (through h and the terms at once) and of the keys, against F.layer_norm + the reference in fp64."""
    B, N, C, pc, pi, kc, ki, npre = 2, 9, 70, 5, 7, 2, 3, 1
    inputs = separated_inputs(B, N, C, pc, pi, dtype)
    norm = torch.nn.LayerNorm(C, eps=1e-6, elementwise_affine=affine).to(DEVICE).requires_grad_(False)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    h, bits, terms = norm_match_select(inputs[0], norm, *inputs[1:], topk_cls=kc, topk_img=ki, num_prefix_tokens=npre,
                                       backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_h = torch.nn.functional.layer_norm(ref_inputs[0], (C,), *[None if p is None else p.double() for p in
                                                                  (norm.weight, norm.bias)], norm.eps)
    ref_terms = reference_terms(*ref_inputs, kc, ki, npre)
    bits_ref, _ = match_select(*inputs, topk_cls=kc, topk_img=ki, num_prefix_tokens=npre, backend=backend)
    assert h.dtype == dtype and torch.equal(bits, bits_ref)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(h.double(), ref_h, atol=atol, rtol=rtol)
    torch.testing.assert_close(terms.double(), ref_terms, atol=2e-5, rtol=2e-4)
    dh = torch.randn(B, N, C, dtype=torch.float64, device=DEVICE)
    dterms = torch.randn(B, N, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((h, terms), inputs, (dh.to(dtype), dterms.float()), retain_graph=True)
    ref_grads = torch.autograd.grad((ref_h, ref_terms), ref_inputs, (dh, dterms), retain_graph=True)
    for name, g, rg in zip(("x", "keys_cls", "keys_img"), grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=atol * float(rg.abs().max()), rtol=rtol, msg=name)
    (dx_norm_only,) = torch.autograd.grad(h, inputs[0], dh.to(dtype))  # matching loss unused: the norm's gradient
    (ref_dx,) = torch.autograd.grad(ref_h, ref_inputs[0], dh)
    torch.testing.assert_close(dx_norm_only.double(), ref_dx, atol=atol * float(ref_dx.abs().max()), rtol=rtol)


def test_fused_layer_norm_refuses_trainable_parameters():
    x, kc, ki = separated_inputs(1, 4, 32, 3, 4)
    norm = torch.nn.LayerNorm(32).to(DEVICE)  # weight and bias require grad
    with pytest.raises(ValueError, match="norm_weight/norm_bias: the fused layer norm takes frozen parameters"):
        norm_match_select(x, norm, kc, ki, topk_cls=1, topk_img=1, num_prefix_tokens=1, backend="torch")


def test_errors_name_the_argument():
    x, kc, ki = separated_inputs(1, 4, 32, 3, 4)
    with pytest.raises(TypeError, match="x: backend='triton'.*float64"):
        match_select(x.double(), kc.double(), ki.double(), topk_cls=1, topk_img=1, backend="triton")
    with pytest.raises(ValueError, match="topk_img: expected an int in \\[1, 4\\], got 5"):
        match_select(x, kc, ki, topk_cls=1, topk_img=5)
    with pytest.raises(ValueError, match="keys_img: expected shape \\(pool >= 1, 32\\)"):
        match_select(x, kc, ki[:, :16], topk_cls=1, topk_img=1)
