"""Every supported timm block family: the patched model against the family's own forward on [prompts ; tokens].

For each family (small models built without weights, fp64, torch backend):
- every pool entry selected and ``renormalize=True``: the TCPA model equals the unpatched model whose blocks run on
  [prompts ; tokens] with a per-pool attention mask through their own attention (``reference/prefix.py``);
- top-k selection, both mask semantics: logits, matching loss and every trainable gradient equal that official-style
  computation (the published post-softmax mask through an eager stand-in for SDPA);
- ``remove_prompts`` gives back identical logits; ``torch.compile(fullgraph=True)`` runs without a graph break;
- VPT-deep equals the family's own forward on [prompts ; tokens] (RoPE: prompts without rotation).
"""

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tcpa_kernels as tk
from reference.prefix import deep_vpt_prompts, prefix_prompts
from tests._helpers import SMALL, TIMM_FAMILIES, assert_backends_agree, assert_prompted_matches_reference

POOLS = dict(pool_size_cls=3, pool_size_img=4, prompt_len_cls=2, prompt_len_img=1)
LENS = dict(prompt_len_cls=2, prompt_len_img=1)
TOPK = dict(topk_cls=2, topk_img=3)


def plain_model(family, seed=0):
    torch.manual_seed(seed)
    return TIMM_FAMILIES[family]().double().eval()


def images(B=2, seed=1):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer_params(model):
    return [(b.tcpa.keys_cls, b.tcpa.keys_img, b.tcpa.prompts_cls, b.tcpa.prompts_img) for b in model.blocks]


def prompted(family, topk, renormalize):
    plain = plain_model(family)
    model = tk.apply_tcpa(copy.deepcopy(plain), backend="torch", renormalize=renormalize, num_classes=5,
                          **POOLS, **topk)
    plain.head = model.head  # the new head, shared: its gradient is compared too
    return plain, model


def reference_forward(plain, model, x, topk, renormalize):
    """Logits and matching loss of the official-style computation on the unpatched model."""
    with prefix_prompts(plain.blocks, layer_params(model), **LENS, **topk, renormalize=renormalize,
                        num_prefix_tokens=plain.num_prefix_tokens) as losses:
        logits = plain(x)
    return logits, sum(losses)


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_every_entry_selected_equals_the_family_forward_with_a_pool_mask(family):
    every = dict(topk_cls=POOLS["pool_size_cls"], topk_img=POOLS["pool_size_img"])
    plain, model = prompted(family, every, renormalize=True)
    x = images()
    ref_logits, _ = reference_forward(plain, model, x, every, renormalize=True)
    torch.testing.assert_close(model(x), ref_logits, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_topk_logits_loss_and_gradients_equal_fp64_official_style(family, renormalize):
    plain, model = prompted(family, TOPK, renormalize)
    x = images()
    model_loss = (model(x), tk.get_matching_loss(model))
    params = tk.trainable_parameters(model)
    assert len(params) == 4 * len(model.blocks) + 2
    assert_prompted_matches_reference(model_loss, reference_forward(plain, model, x, TOPK, renormalize), params)


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_remove_prompts_restores_identical_logits(family):
    model = plain_model(family)
    x = images()
    before, keys = model(x), set(model.state_dict())
    tk.apply_tcpa(model, backend="torch", **POOLS, **TOPK)
    assert not torch.allclose(model(x), before)
    tk.remove_prompts(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("family", ["vit_res_post_block", "vit_parallel_scaling_block", "eva_rope_gqa_dinov3"])
def test_compile_fullgraph(family):
    model = tk.apply_tcpa(plain_model(family).float(), backend="torch", **POOLS, **TOPK)
    x = images().float()
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    (out.sum() + tk.get_matching_loss(model)).backward()
    assert model.blocks[0].tcpa.prompts_img.grad.abs().sum() > 0


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_vpt_deep_equals_the_family_forward_on_prefix_prompts(family):
    plain = plain_model(family)
    model = tk.apply_vpt(copy.deepcopy(plain), num_prompts=3, num_classes=5)
    plain.head = model.head
    x = images()
    logits = model(x)
    params = tk.trainable_parameters(model)
    grads = torch.autograd.grad(logits.square().sum(), params)
    with deep_vpt_prompts(plain.blocks, [blk.vpt_prompts for blk in model.blocks]):
        ref_logits = plain(x)
    ref_grads = torch.autograd.grad(ref_logits.square().sum(), params)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-9)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name, reason", [
    ("naflexvit_base_patch16_gap", "per-sample key-padding masks"),
    ("beit_base_patch16_224", "relative-position bias"),
    ("vit_relpos_base_patch16_224", "relative-position bias"),
])
def test_refused_models_say_why(name, reason):
    import timm

    model = timm.create_model(name, pretrained=False, depth=1, img_size=32)
    with pytest.raises(TypeError, match=f"model: expected a timm VisionTransformer .*{reason}"):
        tk.apply_tcpa(model)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_refused_block_says_why():
    from timm.models.vision_transformer import DiffParallelScalingBlock

    model = VisionTransformer(**SMALL, block_fn=DiffParallelScalingBlock)
    with pytest.raises(TypeError, match=r"model.blocks\[0\]: no TCPA/VPT integration for DiffParallelScalingBlock "
                                        r".*subtracts two softmaxes"):
        tk.apply_vpt(model, num_prompts=2)


def test_block_with_another_attention_is_refused():
    """timm's Block runs the lean path, which computes the attention from timm Attention's parts: another attention
    (differential attention, or a user's subclass that may change the math) in a Block is refused, saying why."""
    from timm.layers import Attention
    from timm.layers.diff_attention import DiffAttention

    class MyAttention(Attention):
        pass

    for attn_layer, reason in ((DiffAttention, "subtracts two softmaxes"), (MyAttention, "")):
        model = VisionTransformer(**SMALL, attn_layer=attn_layer)
        with pytest.raises(TypeError, match=rf"model.blocks\[0\]: no TCPA/VPT integration for Block .*{reason}"):
            tk.apply_tcpa(model)
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["vit_parallel_things_block", "eva_rope_gqa_dinov3"])
def test_triton_kernels_equal_torch_path(family):
    """The Triton kernels (interpreter on CPU) on a family's own forward: logits, matching loss, gradients (fp32)."""
    assert_backends_agree(lambda backend: tk.apply_tcpa(plain_model(family).float(), backend=backend, **POOLS, **TOPK),
                          images().float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit_parallel_scaling_block", "eva_rope_gqa_dinov3"])
def test_grad_checkpointing_same_gradients(family):
    """A checkpointed block recomputes its selection and prompts (prompt dropout replays its mask)."""
    grads = []
    for checkpointing in (False, True):
        model = tk.apply_tcpa(plain_model(family), backend="torch", prompt_dropout=0.5, **POOLS, **TOPK)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(3)
        loss = model(images()).square().sum() + tk.get_matching_loss(model)
        grads.append(torch.autograd.grad(loss, tk.trainable_parameters(model)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("family", ["eva02", "vit_parallel_scaling_block"])
def test_pre_attention_norm_rides_on_the_matching_kernel(family, monkeypatch):
    """Pre-norm blocks with one attention get norm1(x) from the matching kernel: no layer norm of the N tokens runs
    for it (only norm2, the final norm and the prompts' norms), and the block input is read once for both."""
    import torch.nn.functional as F

    calls = []
    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda x, *a, **k: calls.append(tuple(x.shape)) or layer_norm(x, *a, **k))
    plain, x = plain_model(family), images()
    plain(x)
    N = plain.patch_embed.num_patches + plain.num_prefix_tokens
    is_tokens = lambda shape: shape[:2] == (2, N)  # [B=2, N, C] inputs (the prompts' are [L, P, C])
    token_norms = sum(map(is_tokens, calls))
    calls.clear()
    tk.apply_tcpa(plain, backend="torch", **POOLS, **TOPK)(x)
    assert token_norms > len(plain.blocks)
    assert sum(map(is_tokens, calls)) == token_norms - len(plain.blocks)
