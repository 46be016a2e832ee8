"""The reference itself: fp64 gradcheck, and agreement with independent formulations of the same math."""

import torch

from reference import match_prompts_ref, tcpa_attention_ref, vpt_attention_ref
from reference.matching import prompt_entry_index, topk_entries
from tests.conftest import attention_inputs, fp64


def _inputs(shared, seed=0):
    tensors, mask = attention_inputs(2, 2, 5, 3, 4, shared=shared, device="cpu", seed=seed)
    return fp64(tensors), mask


def test_gradcheck_tcpa_attention_ref():
    for renormalize in (False, True):
        for shared in (True, False):
            tensors, mask = _inputs(shared)
            assert torch.autograd.gradcheck(
                lambda *t, m=mask, r=renormalize: tcpa_attention_ref(*t, m, renormalize=r), tensors
            )


def test_gradcheck_match_prompts_ref_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kc = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss = lambda *t: match_prompts_ref(*t, topk_cls=2, topk_img=3, num_prefix_tokens=2)[1]
    assert torch.autograd.gradcheck(loss, (x, kc, ki))


def test_gradcheck_vpt_attention_ref():
    tensors, _ = _inputs(True)
    assert torch.autograd.gradcheck(vpt_attention_ref, tensors[:3])


def test_post_softmax_mask_by_explicit_formula():
    """out_q = sum over tokens and selected prompts of e^s v / sum over tokens and ALL prompts of e^s."""
    (q, k, v, pk, pv), mask = _inputs(False)
    out = tcpa_attention_ref(q, k, v, pk, pv, mask)
    scale = q.shape[-1] ** -0.5
    for b, h, n in [(0, 0, 0), (1, 1, 4), (1, 0, 2)]:
        e_tok = torch.exp(scale * k[b, h] @ q[b, h, n])
        e_pr = torch.exp(scale * pk[b, h] @ q[b, h, n])
        num = e_tok @ v[b, h] + (e_pr * mask[b, n]) @ pv[b, h]
        torch.testing.assert_close(out[b, h, n], num / (e_tok.sum() + e_pr.sum()))


def test_all_prompts_selected_is_plain_attention_over_prompts_and_tokens():
    (q, k, v, pk, pv), mask = _inputs(True)
    full = torch.ones_like(mask)
    B = q.shape[0]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    for renormalize in (False, True):
        out = tcpa_attention_ref(q, k, v, pk, pv, full, renormalize=renormalize)
        expected = torch.nn.functional.scaled_dot_product_attention(q, keys, vals)
        torch.testing.assert_close(out, expected)


def test_renormalize_equals_attention_over_selected_prompts_only():
    (q, k, v, pk, pv), mask = _inputs(True)
    out = tcpa_attention_ref(q, k, v, pk, pv, mask, renormalize=True)
    b, n = 1, 3
    sel = mask[b, n]
    keys = torch.cat([pk[:, sel], k[b]], 1)
    vals = torch.cat([pv[:, sel], v[b]], 1)
    expected = vpt_attention_ref(q[b, :, n : n + 1], keys, vals)[:, 0]
    torch.testing.assert_close(out[b, :, n], expected)


def test_match_prompts_ref_pools_and_ties():
    entry = prompt_entry_index(2, 3, 2, 1)
    assert entry.tolist() == [0, 0, 1, 1, 2, 3, 4]
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    assert topk_entries(scores, 2).tolist() == [[True, True, False, False]]  # tie at 0.5: index 0 wins
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    kc, ki = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask, _ = match_prompts_ref(x, kc, ki, topk_cls=1, topk_img=2, prompt_len_cls=2, num_prefix_tokens=1)
    assert mask.shape == (1, 3, 7)
    assert mask[0, 0, 4:].sum() == 0 and mask[0, 0, :4].sum() == 2  # CLS token: one CLS entry of 2 tokens
    assert (mask[0, 1:, :4].sum(-1) == 0).all() and (mask[0, 1:, 4:].sum(-1) == 2).all()
