"""open_clip vision towers and CLIP models: the patched model against open_clip's own blocks on [prompts ; tokens].

For open_clip's ``VisionTransformer`` (``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``), whole
``CLIP`` / ``CustomTextCLIP`` models and a CLIP whose tower wraps a timm ViT (small models built without weights,
fp64, torch backend):
- every pool entry selected and ``renormalize=True``: the TCPA model equals the unpatched model whose vision blocks run
  on [prompts ; tokens] with a per-pool attention mask (``reference/open_clip_prefix.py``, ``reference/prefix.py``);
- top-k selection, both mask semantics: outputs, matching loss and every trainable gradient equal that computation;
- only the prompts and keys train (text tower included), ``remove_prompts`` restores outputs, keys and flags;
- ``save_prompts`` / ``load_prompts`` round trip; ``torch.compile(fullgraph=True)``; VPT-deep; clear refusals.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from open_clip.transformer import VisionTransformer  # noqa: E402

import tcpa_kernels as tk  # noqa: E402
from reference.open_clip_prefix import open_clip_prefix_prompts  # noqa: E402
from reference.prefix import deep_vpt_prompts, prefix_prompts  # noqa: E402
from tcpa_kernels.dense_baseline import apply_dense_tcpa  # noqa: E402
from tests._helpers import assert_prompted_matches_reference  # noqa: E402

TOWER = dict(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=8)
VISION = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16, mlp_ratio=2.0)
TEXT = dict(context_length=6, vocab_size=40, width=16, heads=2, layers=1)
CUSTOM = dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True)


def timm_trunk_clip():
    """A CLIP whose tower wraps timm's ``test_vit``, cut to 2 blocks and resized to 3x3 patches."""
    model = open_clip.CLIP(embed_dim=8, vision_cfg=dict(timm_model_name="test_vit", image_size=48), text_cfg=TEXT)
    model.visual.set_input_size(48)
    model.visual.trunk.blocks = model.visual.trunk.blocks[:2]
    return model


MODELS = {
    "tower": lambda: VisionTransformer(**TOWER, ls_init_value=0.5),
    "tower_custom_block": lambda: VisionTransformer(**TOWER, **CUSTOM),
    "clip": lambda: open_clip.CLIP(embed_dim=8, vision_cfg=VISION, text_cfg=TEXT),
    "custom_text_clip_attn_pool": lambda: open_clip.CustomTextCLIP(
        embed_dim=8, vision_cfg=VISION | dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2),
        text_cfg=TEXT),
    "clip_timm_trunk": timm_trunk_clip,
}
POOLS = dict(pool_size_cls=3, pool_size_img=4, prompt_len_cls=2, prompt_len_img=1)
LENS = dict(prompt_len_cls=2, prompt_len_img=1)
TOPK = dict(topk_cls=2, topk_img=3)
TOKENS = torch.randint(0, TEXT["vocab_size"], (3, TEXT["context_length"]), generator=torch.Generator().manual_seed(2))


def plain_model(name, seed=0):
    """The model in fp64 with every parameter perturbed: zero biases, unit norms and head scales (open_clip's
    initialisation) would hide a missing bias, norm or scale."""
    torch.manual_seed(seed)
    model = MODELS[name]().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images(model, B=2, seed=1):
    size = 48 if isinstance(getattr(model, "visual", None), open_clip.timm_model.TimmModel) else 16
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tower(model):
    return model.visual if hasattr(model, "visual") else model


def vision_blocks(model):
    t = tower(model)
    return t.trunk.blocks if hasattr(t, "trunk") else t.transformer.resblocks


def outputs(model, x):
    """A tower's image features, or a CLIP model's image-text logits [B, T] (its whole forward)."""
    if not hasattr(model, "visual"):
        return model(x)
    image, text, scale = model(x, TOKENS)
    return scale * image @ text.T


def reference_outputs(plain, model, x, topk, renormalize):
    """``outputs`` and the matching loss of the official-style computation on the unpatched model; only the vision
    tower runs under the hooks (the post-softmax stand-in for SDPA would also apply to the text tower's mask)."""
    params = [(b.tcpa.keys_cls, b.tcpa.keys_img, b.tcpa.prompts_cls, b.tcpa.prompts_img) for b in vision_blocks(model)]
    t = tower(plain)
    if hasattr(t, "trunk"):
        hooks = prefix_prompts(t.trunk.blocks, params, **LENS, **topk, renormalize=renormalize,
                               num_prefix_tokens=t.trunk.num_prefix_tokens)
    else:
        hooks = open_clip_prefix_prompts(t.transformer.resblocks, params, **LENS, **topk, renormalize=renormalize)
    with hooks as losses:
        image = t(x)
    if t is plain:
        return image, sum(losses)
    text = F.normalize(plain.encode_text(TOKENS), dim=-1)
    return plain.logit_scale.exp() * F.normalize(image, dim=-1) @ text.T, sum(losses)


def prompted(name, topk, renormalize):
    plain = plain_model(name)
    model = tk.apply_tcpa(copy.deepcopy(plain), backend="torch", renormalize=renormalize, **POOLS, **topk)
    return plain, model


@pytest.mark.parametrize("name", MODELS)
def test_every_entry_selected_equals_the_blocks_on_prefix_prompts_with_a_pool_mask(name):
    every = dict(topk_cls=POOLS["pool_size_cls"], topk_img=POOLS["pool_size_img"])
    plain, model = prompted(name, every, renormalize=True)
    x = images(plain)
    ref, _ = reference_outputs(plain, model, x, every, renormalize=True)
    torch.testing.assert_close(outputs(model, x), ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_topk_outputs_loss_and_gradients_equal_fp64_official_style(name, renormalize):
    plain, model = prompted(name, TOPK, renormalize)
    x = images(plain)
    model_loss = (outputs(model, x), tk.get_matching_loss(model))
    params = tk.trainable_parameters(model)
    assert len(params) == 4 * len(vision_blocks(model))
    assert_prompted_matches_reference(model_loss, reference_outputs(plain, model, x, TOPK, renormalize), params)


def flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_only_prompts_train_and_remove_prompts_restores_outputs_keys_and_flags(name):
    model = plain_model(name)
    if hasattr(model, "visual"):  # flags of the user's own choice come back too
        model.logit_scale.requires_grad_(False)
    x = images(model)
    before, keys, before_flags = outputs(model, x), set(model.state_dict()), flags(model)
    tk.apply_tcpa(model, backend="torch", **POOLS, **TOPK)
    trainable = {n for n, train in flags(model).items() if train}
    assert trainable == {n for n in flags(model) if ".tcpa." in n} and len(trainable) == 4 * len(vision_blocks(model))
    assert not torch.allclose(outputs(model, x), before)
    tk.remove_prompts(model)
    assert set(model.state_dict()) == keys
    assert flags(model) == before_flags
    assert torch.equal(outputs(model, x), before)


def test_save_and_load_prompts_into_a_fresh_model(tmp_path):
    plain = plain_model("clip")
    model = tk.apply_tcpa(copy.deepcopy(plain), backend="torch", **POOLS, **TOPK)
    x = images(plain)
    tk.save_prompts(model, tmp_path / "prompts.safetensors")
    fresh = tk.load_prompts(copy.deepcopy(plain), tmp_path / "prompts.safetensors")
    assert fresh.prompt_state.config == model.prompt_state.config
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_compile_fullgraph():
    model = tk.apply_tcpa(plain_model("tower").float(), backend="torch", **POOLS, **TOPK)
    x = images(model).float()
    eager = model(x)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    (out.sum() + tk.get_matching_loss(model)).backward()
    assert model.transformer.resblocks[0].tcpa.prompts_img.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tower", "tower_custom_block", "clip"])
def test_vpt_deep_equals_the_blocks_on_prefix_prompts(name):
    plain = plain_model(name)
    model = tk.apply_vpt(copy.deepcopy(plain), num_prompts=3)
    x = images(plain)
    out = outputs(model, x)
    params = tk.trainable_parameters(model)
    grads = torch.autograd.grad(out.square().sum(), params)
    with deep_vpt_prompts(vision_blocks(plain), [blk.vpt_prompts for blk in vision_blocks(model)]):
        ref = outputs(plain, x)  # no mask: the text tower's own SDPA runs unchanged
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", ["tower", "tower_custom_block"])
def test_a_prompted_block_refuses_an_attention_mask_and_cross_attention(name):
    model = tk.apply_tcpa(plain_model(name), backend="torch", **POOLS, **TOPK)
    blk, tokens = model.transformer.resblocks[0], torch.randn(2, 17, 32, dtype=torch.float64)
    mask = torch.zeros(17, 17, dtype=torch.float64)
    with pytest.raises(ValueError, match="attn_mask"):
        blk(tokens, attn_mask=mask)
    with pytest.raises(ValueError, match="attn_mask"):  # the attention's own check
        if name == "tower":
            blk(tokens, None, None, mask)  # positional, as open_clip's gradient checkpointing passes it
        else:
            blk.attn(blk.ln_1(tokens), attn_mask=mask)
    if name == "tower":
        with pytest.raises(ValueError, match="key/value: .*self-attention only"):
            blk.attn(tokens, tokens.flip(1), tokens.flip(1), need_weights=False)
        with pytest.raises(ValueError, match="need_weights: .*got key_padding_mask=None, need_weights=True"):
            blk.attn(tokens, tokens, tokens)


@pytest.mark.parametrize("method", [tk.apply_tcpa, tk.apply_vpt])
def test_num_classes_is_refused_and_the_model_left_as_it_was(method):
    model = plain_model("clip")
    keys, before_flags, cls = set(model.state_dict()), flags(model), type(model)
    kwargs = dict(num_prompts=3) if method is tk.apply_vpt else dict(backend="torch")
    with pytest.raises(ValueError, match="num_classes: .*no classification head.*got 5"):
        method(model, num_classes=5, **kwargs)
    assert type(model) is cls and not hasattr(model, "prompt_state")
    assert set(model.state_dict()) == keys and flags(model) == before_flags
    assert all(type(blk) is open_clip.transformer.ResidualAttentionBlock for blk in vision_blocks(model))


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: VisionTransformer(**TOWER, scaled_cosine_attn=True), TypeError, "scaled cosine"),
    (lambda: open_clip.CLIP(embed_dim=8, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=32),
                            text_cfg=TEXT), TypeError, "model.visual: expected an open_clip VisionTransformer"),
    (lambda: open_clip.CLIP(embed_dim=8, vision_cfg=dict(timm_model_name="test_convnext"), text_cfg=TEXT), TypeError,
     r"model.visual.trunk: expected a timm VisionTransformer or Eva, got .*ConvNeXt"),
])
def test_unsupported_towers_are_refused(build, error, match):
    with pytest.raises(error, match=match):
        tk.apply_tcpa(build(), backend="torch")


def test_dense_baseline_is_refused():
    with pytest.raises(TypeError, match="model: the published dense-mask baseline is implemented for timm ViTs"):
        apply_dense_tcpa(plain_model("tower"), backend="torch")
