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
    norm = torch.nn.LayerNorm(C, eps=1e-6).to(DEVICE, dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    if fused_norm:
        h, bits, terms = norm_match_select(inputs[0], norm, *inputs[1:], **kwargs)
    else:
        bits, terms = match_select(*inputs, **kwargs)
    for b, t in enumerate(ORDERS[order]):  # the selection of the sample against its own set alone
        alone, _ = match_select(inputs[0][b:b + 1], inputs[1][t], inputs[2][t], **(kwargs | dict(tasks=None)))
        assert torch.equal(bits[b:b + 1], alone), f"sample {b}"

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_x, ref_cls, ref_img = ref_inputs
    ref_terms = torch.cat([reference_terms(ref_x[b:b + 1], ref_cls[t], ref_img[t], K_CLS, K_IMG, PREFIX)
                           for b, t in enumerate(ORDERS[order])]) / B  # each alone, with the batch's weights
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(terms.double(), ref_terms, atol=atol, rtol=rtol)
    g = torch.Generator().manual_seed(1)
    dterms = torch.randn(B, N, generator=g, dtype=torch.float64).to(DEVICE)
    outputs, ref_outputs, cotangents = [terms], [ref_terms], [dterms]
    if fused_norm:  # the norm's gradient flows into dx with the matching's
        outputs.append(h)
        ref_outputs.append(torch.nn.functional.layer_norm(ref_x, (C,), norm.weight.double(), norm.bias.double(),
                                                          norm.eps))
        cotangents.append(torch.randn(B, N, C, generator=g, dtype=torch.float64).to(DEVICE))
    grads = torch.autograd.grad(outputs, inputs, [c.to(o.dtype) for c, o in zip(cotangents, outputs)])
    ref_grads = torch.autograd.grad(ref_outputs, ref_inputs, cotangents)
    for name, grad, ref in zip(("x", "bank_cls", "bank_img"), grads, ref_grads):
        assert grad.shape == ref.shape, name
        torch.testing.assert_close(grad.double(), ref, atol=atol * float(ref.abs().max()), rtol=rtol, msg=name)
    if order == "single":  # sets no sample matched get a zero gradient
        assert not grads[1][[0, 2]].any() and not grads[2][[0, 2]].any()


def test_bank_matching_argument_errors():
    (x, bank_cls, bank_img), tasks = _bank_inputs(torch.float64, "mixed")
    kwargs = dict(topk_cls=K_CLS, topk_img=K_IMG, backend="torch")
    with pytest.raises(ValueError, match=r"keys_img: expected shape \(3, pool >= 1, 48\)"):
        match_select(x, bank_cls, bank_img[:2], tasks=tasks, **kwargs)
    with pytest.raises(ValueError, match=r"keys_cls: expected 3-d tensor, got shape \(5, 48\)"):
        match_select(x, bank_cls[0], bank_img, tasks=tasks, **kwargs)
    with pytest.raises(ValueError, match=r"selection.tasks: expected values in \[0, 3\)"):
        match_select(x, bank_cls, bank_img, tasks=tasks + 1, **kwargs)
