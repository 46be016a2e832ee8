"""VFPT's Fourier prompts and per-sample prompt dropout (docs/how-it-works.md, 'Fourier prompts') against the fp64
official-style reference."""

import copy
import math
import re

import pytest
import torch

import tcpa_kernels as tk
from reference.prefix import deep_vpt_prompts, prefix_prompts
from tcpa_kernels import _prompt_kv
from tcpa_kernels._forward import last_forward
from tcpa_kernels.dense_baseline import apply_dense_tcpa
from tcpa_kernels.integrations.prompt_tokens import transform_prompts
from tests._helpers import TIMM_FAMILIES, assert_backends_agree, assert_prompted_matches_reference

POOLS = dict(pool_size_cls=3, pool_size_img=4, prompt_len_cls=2, prompt_len_img=1, topk_cls=2, topk_img=3)
REF = dict(prompt_len_cls=2, prompt_len_img=1, topk_cls=2, topk_img=3)
P = 3 * 2 + 4 * 1  # prompt tokens per layer
DROP = 0.3
# the lean timm Block path (fused and the dense baseline), a block run by its own forward with swapped attention
# (EVA-02: separate q/k/v, RoPE), and the block family with its own mixin (ViT-22B's parallel block)
CASES = {"block_fused": ("vit_block", "fused"), "block_dense": ("vit_block", "dense"), "eva02": ("eva02", "fused"),
         "parallel_scaling": ("vit_parallel_scaling_block", "fused")}


def images(B=3, seed=1, dtype=torch.float64):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def prompted(family, attention="fused", **config):
    """(the unpatched fp64 model, the same model with TCPA and the new head shared by both)."""
    torch.manual_seed(0)
    plain = TIMM_FAMILIES[family]().double().eval()
    apply = apply_dense_tcpa if attention == "dense" else tk.apply_tcpa
    model = apply(copy.deepcopy(plain), backend="torch", num_classes=5, **POOLS, **config)
    plain.head = model.head
    return plain, model


def layer_params(model):
    return [(b.tcpa.keys_cls, b.tcpa.keys_img, b.tcpa.prompts_cls, b.tcpa.prompts_img) for b in model.blocks]


def reference(plain, model, x, **kw):
    with prefix_prompts(plain.blocks, layer_params(model), **REF, num_prefix_tokens=plain.num_prefix_tokens,
                        **kw) as losses:
        logits = plain(x)
    return logits, sum(losses)


def dft_real(x):
    """Re(DFT_P x DFT_C^T) of a real x [P, C] from the definition: cos/sin matrices, no FFT."""
    def cos_sin(n):
        angle = 2 * math.pi * torch.outer(torch.arange(n), torch.arange(n)).double() / n
        return angle.cos(), angle.sin()

    (cp, sp), (cc, sc) = cos_sin(x.shape[0]), cos_sin(x.shape[1])
    return cp @ x @ cc - sp @ x @ sc  # e^{-ia} = cos a - i sin a on both sides; real part


def test_fourier_transform_is_the_2d_dft_real_part_of_the_first_fraction():
    x = torch.randn(2, 7, 6, dtype=torch.float64)  # [B, P, C]
    full = transform_prompts(x, "fourier", 1.0)
    for b in range(2):
        torch.testing.assert_close(full[b], dft_real(x[b]), atol=1e-12, rtol=1e-12)
    part = transform_prompts(x, "fourier", 0.5)  # floor(3.5) = 3 tokens transformed, among themselves
    torch.testing.assert_close(part[:, :3], torch.stack([dft_real(x[b, :3]) for b in range(2)]), atol=1e-12,
                               rtol=1e-12)
    assert torch.equal(part[:, 3:], x[:, 3:])
    assert transform_prompts(x, "fourier", 0.1) is x  # floor(0.7) = 0 tokens
    assert transform_prompts(x, "none", 1.0) is x
    half = transform_prompts(x.to(torch.bfloat16), "fourier", 1.0)  # computed in fp32, returned in bf16
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), full, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("fraction", [1.0, 0.45])
@pytest.mark.parametrize("case", CASES)
def test_fourier_tcpa_matches_fp64_official_style(case, fraction):
    family, attention = CASES[case]
    plain, model = prompted(family, attention, prompt_transform="fourier", fourier_fraction=fraction)
    x = images()
    params = tk.trainable_parameters(model)
    assert_prompted_matches_reference(
        (model(x), tk.get_matching_loss(model)),
        reference(plain, model, x, prompt_transform="fourier", fourier_fraction=fraction), params)
    plain_none, none = prompted(family, attention)  # the transform changes the logits
    assert not torch.allclose(none(x), model(x))


def recorded_dropout(monkeypatch, fused=False):
    """Replaces torch's dropout, and the prompt pass node's (``_prompt_kv._dropout``; ``fused``: CUDA's kernel,
    ``native_dropout``, on any device), by itself plus a record of the prompt-dropout outputs (p == DROP)."""
    records, dropout, node_dropout = [], torch.nn.functional.dropout, _prompt_kv._dropout

    def recording(input, p=0.5, training=True, inplace=False):
        out = dropout(input, p, training, inplace)
        if training and p == DROP:
            records.append(out.detach())
        return out

    def node_recording(input, p):
        out, mask = torch.native_dropout(input, p, True) if fused else node_dropout(input, p)
        if p == DROP:
            records.append(out.detach())
        return out, mask

    monkeypatch.setattr(torch.nn.functional, "dropout", recording)
    monkeypatch.setattr(_prompt_kv, "_dropout", node_recording)
    return records


@pytest.mark.parametrize(("transform", "fused"), [("fourier", False), ("none", False), ("none", True)])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_prompt_dropout_matches_fp64_official_style(case, per_sample, transform, fused, monkeypatch):
    """Training-mode forward and gradients with the masks the model drew: one per sample (published) or one for
    the batch, followed by the Fourier transform or not (one mask and no transform: drawn inside the prompt pass's
    node, ``_prompt_kv.PromptParts``, with the CPU's kernels or, ``fused``, CUDA's)."""
    family, attention = CASES[case]
    plain, model = prompted(family, attention, prompt_dropout=DROP, prompt_dropout_per_sample=per_sample,
                            prompt_transform=transform)
    model.train()
    records = recorded_dropout(monkeypatch, fused)
    x = images()
    logits, match = model(x), tk.get_matching_loss(model)
    L, B, C = len(model.blocks), x.shape[0], model.embed_dim
    shape = (-1, B, P, C) if per_sample else (-1, P, C)
    masks = torch.cat([r.reshape(shape) for r in records]) != 0  # [L, (B,) P, C]: the lean path draws one tensor
    assert masks.shape[0] == L and 0.5 < masks.double().mean() < 0.9
    if per_sample:
        assert not torch.equal(masks[:, 0], masks[:, 1]), "samples share a dropout mask"
    multipliers = list(masks.double().div(1 - DROP).unbind(0))
    assert_prompted_matches_reference(
        (logits, match), reference(plain, model, x, prompt_transform=transform, dropout=multipliers),
        tk.trainable_parameters(model))


def test_per_sample_dropout_is_off_in_eval_and_shared_prompt_kv_return():
    _, model = prompted("vit_block", prompt_dropout=DROP, prompt_dropout_per_sample=True)
    x = images()
    model.eval()
    with torch.no_grad():
        model(x)
    kv = last_forward(model.prompt_state).forward.kv  # the prompt K/V of that forward's layers
    assert kv[0].shape == (2, 2, P, 16)  # [2, H, P, D]: no dropout, no batch dimension


@pytest.mark.parametrize("family", ["vit_block", "eva02"])
def test_vfpt_matches_fp64_reference(family):
    torch.manual_seed(0)
    plain = TIMM_FAMILIES[family]().double().eval()
    model = tk.apply_vpt(copy.deepcopy(plain), num_prompts=5, num_classes=5, prompt_transform="fourier",
                         fourier_fraction=0.6)
    plain.head = model.head
    x = images()
    params = tk.trainable_parameters(model)
    logits = model(x)
    with deep_vpt_prompts(plain.blocks, [blk.vpt_prompts for blk in model.blocks], prompt_transform="fourier",
                          fourier_fraction=0.6):
        ref = plain(x)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-9)
    for g, rg in zip(torch.autograd.grad(logits.square().sum(), params), torch.autograd.grad(ref.square().sum(),
                                                                                            params)):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=1e-7)


def test_triton_kernels_take_per_sample_prompt_kv():
    """Per-sample prompt K/V [B, 2, H, P, D] through the Triton kernels (interpreter) equal the torch backend's."""
    def make(backend):
        torch.manual_seed(0)
        model = tk.apply_tcpa(TIMM_FAMILIES["vit_block"](), backend=backend, prompt_dropout=DROP,
                              prompt_dropout_per_sample=True, prompt_transform="fourier", **POOLS).train()
        torch.manual_seed(5)  # the same dropout masks for both
        return model

    assert_backends_agree(make, images(dtype=torch.float32), atol=2e-5, rtol=2e-4)


BAD_OPTIONS = [
    (dict(prompt_transform="fft"), "prompt_transform: expected one of ('none', 'fourier'), got 'fft'"),
    (dict(fourier_fraction=0.0), "fourier_fraction: expected a finite number in (0.0, 1.0], got 0.0"),
    (dict(fourier_fraction=float("nan")), "fourier_fraction: expected a finite number in (0.0, 1.0], got nan"),
    (dict(fourier_fraction=1.5), "fourier_fraction: expected a finite number in (0.0, 1.0], got 1.5"),
]
PER_SAMPLE_NOT_BOOL = (dict(prompt_dropout_per_sample=1),
                       "prompt_dropout_per_sample: expected a bool (True or False), got 1")


@pytest.mark.parametrize("method, kw, message", [("tcpa", *bad) for bad in [*BAD_OPTIONS, PER_SAMPLE_NOT_BOOL]]
                         + [("vpt", *bad) for bad in BAD_OPTIONS])  # VPT's prompts are tokens: dropout per sample
def test_bad_options_are_refused_and_leave_the_model_unchanged(method, kw, message):
    torch.manual_seed(0)
    model = TIMM_FAMILIES["vit_block"]()
    before = copy.deepcopy(model.state_dict())
    apply = tk.apply_tcpa if method == "tcpa" else lambda m, **k: tk.apply_vpt(m, num_prompts=3, **k)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        apply(model, **kw)
    assert not hasattr(model, "prompt_state") and type(model).__name__ == "VisionTransformer"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_load_round_trip_keeps_the_fourier_config(tmp_path):
    _, model = prompted("vit_block", prompt_transform="fourier", fourier_fraction=0.5, prompt_dropout_per_sample=True)
    tk.save_prompts(model, tmp_path / "p.safetensors")
    torch.manual_seed(0)
    fresh = tk.load_prompts(TIMM_FAMILIES["vit_block"]().double().eval(), tmp_path / "p.safetensors")
    cfg = fresh.prompt_state.config
    assert (cfg.prompt_transform, cfg.fourier_fraction, cfg.prompt_dropout_per_sample) == ("fourier", 0.5, True)
    x = images()
    fresh.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(fresh(x), model(x), atol=1e-12, rtol=1e-12)
