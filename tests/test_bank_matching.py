"""Prompt banks in the matching op: key sets of T tasks ([T, pool, C] per pool) and a set per sample (``tasks``).
Selection, loss terms and every gradient equal each sample matched against its own set alone (fp64 reference, the
batch's loss weights), with and without the fused LayerNorm."""

import pytest
import torch

from tcpa_kernels.ops.match_select import match_select, norm_match_select
from tests.conftest import DEVICE, TOLERANCE
from tests.test_match_select import poison_match_buffers, reference_terms, separated_inputs  # noqa: F401

BACKENDS = ["triton", "torch"]
B, N, C, POOL_CLS, POOL_IMG, K_CLS, K_IMG, PREFIX, T = 4, 6, 48, 5, 7, 2, 3, 1, 3
ORDERS = {"mixed": [2, 0, 2, 1], "sorted": [0, 0, 1, 2], "single": [1, 1, 1, 1]}


def _bank_inputs(dtype, order):
    """x [B, N, C] (sample b well separated against its own set's keys), bank_cls [T, Pc, C], bank_img [T, Pi, C]
    (leaves requiring grad), tasks int64 [B] (the bank's dtype; the attention's tests take int32)."""
    sets = [separated_inputs(B, N, C, POOL_CLS, POOL_IMG, dtype, seed=t) for t in range(T)]
    tasks = torch.tensor(ORDERS[order], device=DEVICE)
    x = torch.stack([sets[t][0][b] for b, t in enumerate(ORDERS[order])])
    banks = [torch.stack([s[i] for s in sets]) for i in (1, 2)]
    return [t.detach().requires_grad_() for t in (x, *banks)], tasks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("fused_norm", [False, True], ids=["match", "norm_match"])
def test_bank_matching_matches_each_set_alone(backend, order, fused_norm, poison_match_buffers):  # noqa: F811
    dtype = torch.float64 if backend == "torch" else torch.float32
    inputs, tasks = _bank_inputs(dtype, order)
    kwargs = dict(topk_cls=K_CLS, topk_img=K_IMG, num_prefix_tokens=PREFIX, backend=backend, tasks=tasks)
    bits, terms, h, norm = _bank_matching(inputs, kwargs, fused_norm)
    for b, t in enumerate(ORDERS[order]):  # the selection of the sample against its own set alone
        alone, _ = match_select(inputs[0][b:b + 1], inputs[1][t], inputs[2][t], **(kwargs | dict(tasks=None)))
        assert torch.equal(bits[b:b + 1], alone), f"sample {b}"

    def reference(x, bank_cls, bank_img):  # each sample alone, with the batch's weights
        return torch.cat([reference_terms(x[b:b + 1], bank_cls[t], bank_img[t], K_CLS, K_IMG, PREFIX)
                          for b, t in enumerate(ORDERS[order])]) / B

    grads = _assert_matches_reference(inputs, terms, h, norm, reference)
    if order == "single":  # sets no sample matched get a zero gradient
        assert not grads[1][[0, 2]].any() and not grads[2][[0, 2]].any()


def _bank_matching(inputs, kwargs, fused_norm):
    """(bits, terms, h, norm): ``match_select`` of inputs (x, keys_cls, keys_img) with ``kwargs``, or with
    ``fused_norm`` ``norm_match_select`` with a frozen LayerNorm ``norm`` of random affine (h its output; else
    None)."""
    x = inputs[0]
    norm = torch.nn.LayerNorm(C, eps=1e-6).to(DEVICE, x.dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    if fused_norm:
        h, bits, terms = norm_match_select(x, norm, *inputs[1:], **kwargs)
        return bits, terms, h, norm
    return *match_select(*inputs, **kwargs), None, norm


def _assert_matches_reference(inputs, terms, h, norm, reference):
    """The loss terms, and the gradients of inputs (x, keys_cls, keys_img) through them (and through the fused norm's
    h when given), equal fp64's: ``reference(x, keys_cls, keys_img)`` gives the reference terms. Returns the
    gradients."""
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_terms = reference(*ref_inputs)
    atol, rtol = TOLERANCE[inputs[0].dtype]
    torch.testing.assert_close(terms.double(), ref_terms, atol=atol, rtol=rtol)
    g = torch.Generator().manual_seed(1)
    dterms = torch.randn(B, N, generator=g, dtype=torch.float64).to(DEVICE)
    outputs, ref_outputs, cotangents = [terms], [ref_terms], [dterms]
    if h is not None:  # the norm's gradient flows into dx with the matching's
        outputs.append(h)
        ref_outputs.append(torch.nn.functional.layer_norm(ref_inputs[0], (C,), norm.weight.double(),
                                                          norm.bias.double(), norm.eps))
        cotangents.append(torch.randn(B, N, C, generator=g, dtype=torch.float64).to(DEVICE))
    grads = torch.autograd.grad(outputs, inputs, [c.to(o.dtype) for c, o in zip(cotangents, outputs)])
    ref_grads = torch.autograd.grad(ref_outputs, ref_inputs, cotangents, materialize_grads=True)
    for name, grad, ref in zip(("x", "bank_cls", "bank_img"), grads, ref_grads):
        assert grad.shape == ref.shape, name
        torch.testing.assert_close(grad.double(), ref, atol=atol * float(ref.abs().max()), rtol=rtol, msg=name)
    return grads


def test_bank_matching_argument_errors():
    (x, bank_cls, bank_img), tasks = _bank_inputs(torch.float64, "mixed")
    kwargs = dict(topk_cls=K_CLS, topk_img=K_IMG, backend="torch")
    with pytest.raises(ValueError, match=r"keys_img: expected shape \(3, pool >= 1, 48\)"):
        match_select(x, bank_cls, bank_img[:2], tasks=tasks, **kwargs)
    with pytest.raises(ValueError, match=r"keys_cls: expected 3-d tensor, got shape \(5, 48\)"):
        match_select(x, bank_cls[0], bank_img, tasks=tasks, **kwargs)
    with pytest.raises(ValueError, match=r"selection.tasks: expected values in \[0, 3\)"):
        match_select(x, bank_cls, bank_img, tasks=tasks + 1, **kwargs)


# Tasks whose own pools differ, (pool_cls, pool_img, k_cls, k_img) each, padded to the largest pools; the k passed
# (the kernels' loop bound) is the largest k. Task 2 picks its whole CLS pool.
LAYOUTS = [(2, 7, 1, 3), (5, 4, 2, 2), (3, 6, 3, 1)]
PAD_CLS, PAD_IMG = (max(layout[i] for layout in LAYOUTS) for i in (0, 1))
TOPK_CLS, TOPK_IMG = (max(layout[i] for layout in LAYOUTS) for i in (2, 3))


def _layout_inputs(dtype, order, layouts_dtype=torch.int64):
    """x [B, N, C] (sample b well separated against its task's own keys), bank_cls [T, PAD_CLS, C], bank_img
    [T, PAD_IMG, C] (leaves requiring grad: task t's own keys, then padding rows close to every token, which would
    win the top-k were they read into it), tasks int64 [B] and layouts [B, 6] (each sample's task's)."""
    sets = [separated_inputs(B, N, C, pc, pi, torch.float64, seed=t) for t, (pc, pi, _, _) in enumerate(LAYOUTS)]
    g = torch.Generator().manual_seed(T)
    banks = []
    for i, pad in ((1, PAD_CLS), (2, PAD_IMG)):
        rows = []
        for s in sets:
            directions = torch.cat([s[1], s[2]]).detach()  # the task's keys: every token is a positive mix of them
            hot = 1 + 0.1 * torch.rand(pad - s[i].shape[0], directions.shape[0], generator=g, dtype=torch.float64)
            rows.append(torch.cat([s[i].detach(), hot.to(DEVICE) @ directions]))
        banks.append(torch.stack(rows))
    x = torch.stack([sets[t][0][b] for b, t in enumerate(ORDERS[order])]).detach()
    tasks = torch.tensor(ORDERS[order], device=DEVICE)
    layouts = torch.tensor([LAYOUTS[t] + (1, 1) for t in ORDERS[order]], dtype=layouts_dtype,
                           device=DEVICE)  # prompt lengths, which matching does not read: 1
    return [t.to(dtype).requires_grad_() for t in (x, *banks)], tasks, layouts


def _padded_bits(bits, pool_cls):
    """Selection words of pools [pool_cls ; image] as words of the padded pools (image entries from PAD_CLS)."""
    return (bits & ((1 << pool_cls) - 1)) | ((bits >> pool_cls) << PAD_CLS)


def test_padding_rows_would_win_the_top_k():
    """The padding of ``_layout_inputs`` is not inert: matched as ordinary entries (no layouts), every token whose
    pool is padded selects a padded row."""
    inputs, tasks, _ = _layout_inputs(torch.float64, "mixed")
    bits, _ = match_select(*inputs, topk_cls=TOPK_CLS, topk_img=TOPK_IMG, num_prefix_tokens=PREFIX, backend="torch",
                           tasks=tasks)
    for b, t in enumerate(ORDERS["mixed"]):
        pc, pi, _, _ = LAYOUTS[t]
        groups = ((slice(0, PREFIX), range(pc, PAD_CLS)), (slice(PREFIX, N), range(PAD_CLS + pi, PAD_CLS + PAD_IMG)))
        for tokens, padded in groups:
            if padded:
                assert (bits[b, tokens] & sum(1 << e for e in padded)).all(), f"sample {b}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("fused_norm", [False, True], ids=["match", "norm_match"])
def test_bank_layouts_match_each_task_alone(backend, order, fused_norm, poison_match_buffers):  # noqa: F811
    """Tasks with pools of different sizes padded to the largest (``layouts``): selection words, loss terms (the
    sample's own k in its weights) and every gradient equal each sample matched alone against its task's own keys
    with its own k (fp64 reference); padded key rows get exactly zero gradient. Layouts in int64 (match) and int32
    (norm_match)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    inputs, tasks, layouts = _layout_inputs(dtype, order, torch.int32 if fused_norm else torch.int64)
    kwargs = dict(topk_cls=TOPK_CLS, topk_img=TOPK_IMG, num_prefix_tokens=PREFIX, backend=backend, tasks=tasks,
                  layouts=layouts)
    bits, terms, h, norm = _bank_matching(inputs, kwargs, fused_norm)
    own = [LAYOUTS[t] for t in ORDERS[order]]
    for b, (t, (pc, pi, kc, ki)) in enumerate(zip(ORDERS[order], own)):  # the sample against its own keys alone
        alone, _ = match_select(inputs[0][b:b + 1], inputs[1][t, :pc], inputs[2][t, :pi], topk_cls=kc, topk_img=ki,
                                num_prefix_tokens=PREFIX, backend=backend)
        assert torch.equal(bits[b:b + 1], _padded_bits(alone, pc)), f"sample {b}"

    def reference(x, bank_cls, bank_img):  # each sample alone against its own keys, with the batch's weights
        return torch.cat([reference_terms(x[b:b + 1], bank_cls[t, :pc], bank_img[t, :pi], kc, ki, PREFIX)
                          for b, (t, (pc, pi, kc, ki)) in enumerate(zip(ORDERS[order], own))]) / B

    grads = _assert_matches_reference(inputs, terms, h, norm, reference)
    for t, (pc, pi, _, _) in enumerate(LAYOUTS):  # padding rows: never read into the loss
        assert not grads[1][t, pc:].any() and not grads[2][t, pi:].any(), f"task {t}"
    for t in set(range(T)) - set(ORDERS[order]):
        assert not grads[1][t].any() and not grads[2][t].any(), f"task {t}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_finite_scores_select_their_own_k(backend):
    """NaN and zero tokens (every score ranking equal) select their sample's own k entries: the lowest of its own
    pool, whatever the padded pools and the k passed."""
    inputs, tasks, layouts = _layout_inputs(torch.float32, "mixed")
    x = inputs[0].detach().clone()
    x[:, 0] = float("nan")  # prefix token
    x[:, 2] = float("nan")  # patch tokens
    x[:, 4] = 0.0
    bits, _ = match_select(x, *inputs[1:], topk_cls=TOPK_CLS, topk_img=TOPK_IMG, num_prefix_tokens=PREFIX,
                           backend=backend, tasks=tasks, layouts=layouts)
    for b, t in enumerate(ORDERS["mixed"]):
        _, _, kc, ki = LAYOUTS[t]
        assert bits[b, 0] == (1 << kc) - 1, f"sample {b}"
        assert bits[b, 2] == bits[b, 4] == ((1 << ki) - 1) << PAD_CLS, f"sample {b}"


def test_bank_layouts_argument_errors():
    inputs, tasks, layouts = _layout_inputs(torch.float64, "mixed")
    x, bank_cls, bank_img = (t.detach() for t in inputs)

    def call(layouts, topk_cls=TOPK_CLS, topk_img=TOPK_IMG):
        match_select(x, bank_cls, bank_img, topk_cls=topk_cls, topk_img=topk_img, backend="torch", tasks=tasks,
                     layouts=layouts)

    def edited(row, column, value):
        out = layouts.clone()
        out[row, column] = value
        return out

    with pytest.raises(ValueError, match=r"layouts: expected int32/int64 shape \(4, 6\) on \S+, got shape \(4, 4\)"):
        call(layouts[:, :4].contiguous())
    with pytest.raises(ValueError, match=r"layouts: expected int32/int64 shape \(4, 6\) on \S+, got shape \(3, 6\)"):
        call(layouts[:3])
    with pytest.raises(ValueError, match=r"layouts: expected 2-d tensor"):
        call(layouts.flatten())
    with pytest.raises(TypeError, match=r"layouts: expected dtype in \['torch.int32', 'torch.int64'\]"):
        call(layouts.float())
    with pytest.raises(ValueError, match=r"layouts: expected a contiguous tensor"):
        call(torch.cat([layouts, layouts], dim=1)[:, ::2])
    with pytest.raises(ValueError, match=r"layouts: expected each sample's pool_cls in \[1, 5\], got \[3, 6\]"):
        call(edited(1, 0, PAD_CLS + 1))  # a pool larger than the padded one
    with pytest.raises(ValueError, match=r"layouts: expected each sample's pool_img in \[1, 7\], got \[0, 6\]"):
        call(edited(1, 1, 0))  # an empty pool
    with pytest.raises(ValueError, match=r"layouts: expected each sample's k_cls in \[1, 3\], at most its pool, "
                                         r"got \[2, 3\]"):
        call(edited(1, 2, 3))  # k_cls 3 of its CLS pool of 2 (sample 1 is task 0's)
    with pytest.raises(ValueError, match=r"layouts: expected each sample's k_img in \[1, 2\], at most its pool, "
                                         r"got \[1, 3\]"):
        call(layouts, topk_img=2)  # a k larger than the k passed (the kernels' loop bound)
    with pytest.raises(ValueError, match=r"layouts: expected each sample's k_cls in \[1, 3\], at most its pool, "
                                         r"got \[0, 3\]"):
        call(edited(0, 2, 0))
