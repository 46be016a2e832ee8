"""Every timm ViT and EVA model name (built without weights, two blocks, a small image): TCPA equals the
official-style prefix-prompt computation of the same model, VPT-deep runs, and ``remove_prompts`` restores the
logits; models with a block the op cannot run must refuse it, saying why. Slow (every timm model of these modules,
~250, about 4 minutes on 2 cores): run with ``--slow`` (CI does)."""

import copy

import pytest
import timm
import torch
from timm.models import _registry

import tcpa_kernels as tk
from reference.prefix import prefix_prompts
from tcpa_kernels.integrations.models import refusal

MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.vision_transformer_hybrid",
           "timm.models.eva")
NAMES = [n for n in timm.list_models() if _registry._model_entrypoints[n].__module__ in MODULES]
POOLS = dict(pool_size_cls=3, pool_size_img=4, topk_cls=2, topk_img=3)


def build(name):
    """The model with two blocks, at 3x3 patches where its patch embedding allows another image size."""
    with torch.device("meta"):  # the full model's layout, without memory
        full = timm.create_model(name, pretrained=False)
    kwargs = dict(depth=2)
    kv_heads = [getattr(getattr(blk, "attn", None), "num_kv_heads", None) for blk in full.blocks[:2]]
    if kv_heads[0] is not None:  # AttentionRope: K/V heads may be a per-block sequence (Sapiens2)
        kwargs["num_kv_heads"] = tuple(kv_heads)
    patch = getattr(full.patch_embed, "patch_size", None)
    for small_image in ((3 * patch[0], 3 * patch[1]),) if patch else ():
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, img_size=small_image, **kwargs).double().eval()
            x = images(model)
            model(x)
            return model, x
        except (RuntimeError, AssertionError):  # a convolutional stem that needs another image size
            pass
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
    return model, images(model)


def images(model):
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if getattr(model.patch_embed, "img_size", None) is not None:
        size = (size[0], *model.patch_embed.img_size)
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_timm_model(name):
    plain, x = build(name)
    before = plain(x)
    model = copy.deepcopy(plain)
    reason = refusal(model.blocks[0]) or refusal(getattr(model.blocks[0], "attn", model.blocks[0]))
    if reason:  # a block the op cannot run (differential attention): refused, saying why, model unchanged
        with pytest.raises(TypeError, match="model.blocks.0.: no TCPA/VPT integration"):
            tk.apply_tcpa(model, backend="torch", **POOLS)
        assert torch.equal(model(x), before)
        return
    tk.apply_tcpa(model, backend="torch", **POOLS)
    logits = model(x)
    params = [(b.tcpa.keys_cls, b.tcpa.keys_img, b.tcpa.prompts_cls, b.tcpa.prompts_img) for b in model.blocks]
    with torch.no_grad(), prefix_prompts(plain.blocks, params, topk_cls=2, topk_img=3,
                                         num_prefix_tokens=plain.num_prefix_tokens) as losses:
        ref = plain(x)
    torch.testing.assert_close(logits, ref, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(tk.get_matching_loss(model), sum(losses), atol=1e-12, rtol=1e-10)
    tk.remove_prompts(model)
    assert torch.equal(model(x), before)
    tk.apply_vpt(model, num_prompts=2)
    assert model(x).shape == before.shape
