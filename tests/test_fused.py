"""Fused top-k selection (TCPAAttention) and match_prompts vs the fp64 reference.

Scores are continuous random draws (tie-free); the tie rule (lower entry index wins) has its own test.
"""

import pytest
import torch

import tcpa_kernels as tk
from reference import match_prompts_ref, tcpa_attention_ref
from reference.matching import prompt_entry_index, topk_entries
from tcpa_kernels.ops.selection import entry_selection, topk_bits
from tests.conftest import DEVICE, assert_matches_reference, attention_inputs, fp64

BACKENDS = ["triton", "torch"]


def reference_mask(scores, pool_cls, topk_cls, topk_img, len_cls, len_img, num_prefix):
    """[B, N, P] mask from scores through the reference's top-k rule."""
    B, N, E = scores.shape
    sel = torch.zeros(B, N, E, dtype=torch.bool, device=scores.device)
    sel[:, :num_prefix, :pool_cls] = topk_entries(scores[:, :num_prefix, :pool_cls], topk_cls)
    sel[:, num_prefix:, pool_cls:] = topk_entries(scores[:, num_prefix:, pool_cls:], topk_img)
    return sel[:, :, prompt_entry_index(pool_cls, E - pool_cls, len_cls, len_img, scores.device)]


# (B, H, N, D, pool_cls, pool_img, topk_cls, topk_img, len_cls, len_img, num_prefix)
CONFIGS = [
    (2, 2, 9, 16, 4, 5, 2, 3, 1, 1, 1),
    (1, 2, 13, 32, 3, 6, 3, 6, 2, 1, 2),  # k = pool size, L > 1, two prefix tokens
    (2, 1, 6, 16, 18, 18, 10, 10, 1, 1, 1),  # published pools
    (1, 1, 5, 16, 2, 30, 1, 1, 1, 2, 0),  # no prefix token, k = 1
    (1, 1, 3, 16, 32, 32, 5, 7, 1, 1, 1),  # 64 entries: bit 63 in use
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matches_reference(backend, config, renormalize, dtype, poison_buffers):
    B, H, N, D, pc, pi, kc, ki, lc, li, npre = config
    P = pc * lc + pi * li
    tensors, _ = attention_inputs(B, H, N, P, D, dtype=dtype, shared=(B % 2 == 0))
    scores = torch.rand(B, N, pc + pi, device=DEVICE)
    out, bits = tk.tcpa_fused_attention(*tensors, scores, pool_cls=pc, topk_cls=kc, topk_img=ki, prompt_len_cls=lc,
                                        prompt_len_img=li, num_prefix_tokens=npre, renormalize=renormalize,
                                        backend=backend)
    mask = reference_mask(scores, pc, kc, ki, lc, li, npre)
    ref_tensors = fp64(tensors)
    ref = tcpa_attention_ref(*ref_tensors, mask, renormalize=renormalize)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_tensors, grad_out)
    grads = torch.autograd.grad(out, tensors, grad_out.to(dtype))
    assert_matches_reference(out, grads, ref, ref_grads, dtype)
    selected = entry_selection(bits, pc + pi)
    assert (selected[:, :npre].sum(-1) == kc).all() and (selected[:, npre:].sum(-1) == ki).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_tie_rule_lower_index_wins(backend):
    scores = torch.tensor([[[0.5, 0.5, 0.9, 0.5, 0.1, 0.1, 0.1],  # prefix: pool_cls = 4
                            [0.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.3]]], device=DEVICE)
    bits = topk_bits(scores, num_prefix_tokens=1, pool_cls=4, k_cls=2, k_img=2, backend=backend)
    assert entry_selection(bits, 7).int().tolist() == [[[1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 1]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_match_prompts_matches_reference(backend, num_prefix):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 24, generator=g).to(DEVICE).requires_grad_()
    kc = torch.empty(5, 24).uniform_(-1, 1, generator=g).to(DEVICE).requires_grad_()
    ki = torch.empty(7, 24).uniform_(-1, 1, generator=g).to(DEVICE).requires_grad_()
    kw = dict(topk_cls=2, topk_img=4, prompt_len_cls=2, prompt_len_img=1, num_prefix_tokens=num_prefix)
    mask, loss = tk.match_prompts(x, kc, ki, backend=backend, **kw)
    ref_inputs = fp64([x, kc, ki])
    ref_mask, ref_loss = match_prompts_ref(*ref_inputs, **kw)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs, allow_unused=True)  # keys_cls unused without prefix
    for g_, rg, t in zip(torch.autograd.grad(loss, [x, kc, ki]), ref_grads, ref_inputs):
        torch.testing.assert_close(g_.double(), torch.zeros_like(t) if rg is None else rg, atol=1e-6, rtol=1e-5)


def test_fused_selection_equals_match_prompts_mask():
    """tcpa_fused_attention(match_scores(x)) == tcpa_attention(match_prompts(x) mask)."""
    B, H, N, D, pc, pi = 2, 2, 10, 16, 4, 6
    x = torch.randn(B, N, 32, device=DEVICE)
    kc, ki = torch.randn(pc, 32, device=DEVICE), torch.randn(pi, 32, device=DEVICE)
    tensors, _ = attention_inputs(B, H, N, pc + pi, D)
    kw = dict(topk_cls=2, topk_img=3, num_prefix_tokens=1)
    mask, loss = tk.match_prompts(x, kc, ki, backend="triton", **kw)
    scores = tk.match_scores(x, kc, ki)
    out, bits = tk.tcpa_fused_attention(*tensors, scores, pool_cls=pc, backend="triton", **kw)
    torch.testing.assert_close(out, tk.tcpa_attention(*tensors, mask, backend="triton"))
    torch.testing.assert_close(tk.matching_loss(scores, bits, 1, 2, 3), loss)


def test_match_scores_ignores_autocast():
    """Under autocast the scores stay in x's dtype and backward keeps x itself, not a 16-bit copy of it."""
    x = torch.randn(2, 6, 8, requires_grad=True)
    kc, ki = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = tk.match_scores(x, kc, ki)  # [B, N, 7]
    assert scores.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in saved), [t.dtype for t in saved]
    torch.testing.assert_close(scores, tk.match_scores(x, kc, ki))
