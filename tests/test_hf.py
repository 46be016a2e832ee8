"""Hugging Face ``transformers`` vision models: the patched model against the model's own layers on [prompts ; tokens].

For each model class (small models built from a config, no weights, fp64, torch backend, SDPA attention):
- every pool entry selected and ``renormalize=True``: the TCPA model equals the unpatched model whose layers run on
  [prompts ; tokens] with a per-pool attention mask through their own attention (``reference/hf_prefix.py``);
- top-k selection, both mask semantics: outputs, matching loss and every trainable gradient equal that official-style
  computation (the published post-softmax mask through an eager stand-in for SDPA);
- ``remove_prompts`` gives back identical outputs, ``state_dict`` keys and labels; ``save_prompts`` / ``load_prompts``
  into a fresh model gives identical outputs;
- VPT equals the layers run on [tokens ; prompts] and is removed cleanly;
- ``torch.compile(fullgraph=True)`` runs without a graph break; masks, attention weights and a head on a headless
  model are refused with errors that name the argument.
"""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", minversion="5.18")  # the integration's floor

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402

import tcpa_kernels as tk  # noqa: E402
from reference.hf_prefix import prefix_prompts_hf  # noqa: E402
from tests._helpers import assert_prompted_matches_reference  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
             attn_implementation="sdpa")
LABELS = dict(id2label={i: f"class_{i}" for i in range(7)})  # 7 named classes: remove_prompts restores the names
CLIP_VISION = dict(SMALL, intermediate_size=64)

# name -> (model factory, tokens before the patches)
MODELS = {
    "vit": (lambda: ViTModel(ViTConfig(**SMALL, intermediate_size=64)), 1),
    "vit_classifier": (lambda: ViTForImageClassification(ViTConfig(**SMALL, intermediate_size=64, **LABELS)), 1),
    "dinov2": (lambda: Dinov2Model(Dinov2Config(**SMALL, mlp_ratio=2, layerscale_value=0.5)), 1),
    "dinov2_classifier_swiglu": (lambda: Dinov2ForImageClassification(
        Dinov2Config(**SMALL, mlp_ratio=2, use_swiglu_ffn=True, **LABELS)), 1),
    "dinov2_registers": (lambda: Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=2, layerscale_value=0.5)), 3),
    "dinov2_registers_classifier": (lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=1, **LABELS)), 2),
    "clip_vision": (lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)), 1),
    "clip_vision_projection": (lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(**CLIP_VISION, projection_dim=16)), 1),
    "clip_classifier": (lambda: CLIPForImageClassification(
        CLIPConfig(vision_config=CLIP_VISION, attn_implementation="sdpa", **LABELS)), 1),
    # no class token; the attention-pooling head is part of the backbone
    "siglip_vision": (lambda: SiglipVisionModel(SiglipVisionConfig(**CLIP_VISION)), 0),
    "siglip_classifier": (lambda: SiglipForImageClassification(
        SiglipConfig(vision_config=CLIP_VISION, attn_implementation="sdpa", **LABELS)), 0),
}
# every check runs on these; the other models (the same layers under another head or wrapper) on the top-k, save/load
# and remove checks
MAIN = ("vit", "vit_classifier", "dinov2", "dinov2_classifier_swiglu", "dinov2_registers", "clip_vision",
        "siglip_vision")
POOLS = dict(pool_size_cls=3, pool_size_img=4, prompt_len_cls=2, prompt_len_img=1)
LENS = dict(prompt_len_cls=2, prompt_len_img=1)
TOPK = dict(topk_cls=2, topk_img=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these shapes are too small to gain from more, and a busy machine makes them lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_model(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name][0]().double().eval()
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "q_proj"))
    return model


def has_head(model):
    return hasattr(model, "classifier")


def layers(model):
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def images(B=2, seed=1):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def features(out):
    """A classifier's logits; else the last hidden state with the pooled output or image embedding, [B, F]."""
    if out.get("logits") is not None:
        return out.logits
    parts = [out[key] for key in ("last_hidden_state", "pooler_output", "image_embeds") if out.get(key) is not None]
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def layer_params(model):
    return [(blk.tcpa.keys_cls, blk.tcpa.keys_img, blk.tcpa.prompts_cls, blk.tcpa.prompts_img)
            for blk in layers(model)]


def prompted(name, topk, renormalize):
    plain = plain_model(name)
    model = tk.apply_tcpa(copy.deepcopy(plain), backend="torch", renormalize=renormalize,
                          num_classes=5 if has_head(plain) else None, **POOLS, **topk)
    if has_head(plain):
        plain.classifier = model.classifier  # the new head, shared: its gradient is compared too
    return plain, model


def reference_forward(name, plain, model, x, topk, renormalize):
    """Outputs and matching loss of the official-style computation on the unpatched model."""
    with prefix_prompts_hf(layers(plain), layer_params(model), **LENS, **topk, renormalize=renormalize,
                           num_prefix_tokens=MODELS[name][1]) as losses:
        out = features(plain(x))
    return out, sum(losses)


@pytest.mark.parametrize("name", MAIN)
def test_every_entry_selected_equals_the_layers_forward_with_a_pool_mask(name):
    every = dict(topk_cls=POOLS["pool_size_cls"], topk_img=POOLS["pool_size_img"])
    plain, model = prompted(name, every, renormalize=True)
    x = images()
    ref, _ = reference_forward(name, plain, model, x, every, renormalize=True)
    torch.testing.assert_close(features(model(x)), ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_topk_outputs_loss_and_gradients_equal_fp64_official_style(name, renormalize):
    plain, model = prompted(name, TOPK, renormalize)
    x = images()
    model_loss = (features(model(x)), tk.get_matching_loss(model))
    params = tk.trainable_parameters(model)
    assert len(params) == 4 * len(layers(model)) + 2 * has_head(model)
    reference = reference_forward(name, plain, model, x, TOPK, renormalize)
    assert_prompted_matches_reference(model_loss, reference, params)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_into_a_fresh_model_then_remove_restores_outputs_keys_and_labels(name, tmp_path):
    model = plain_model(name)
    cls, x = type(model), images()
    before, keys, labels = features(model(x)), set(model.state_dict()), model.config.id2label
    head = model.classifier if has_head(model) else None
    tk.apply_tcpa(model, backend="torch", num_classes=5 if head else None, **POOLS, **TOPK)
    if head:
        assert model.config.num_labels == model.num_labels == model.classifier.out_features == 5
    out = features(model(x))
    assert out.shape != before.shape if head else not torch.allclose(out, before)

    path = tmp_path / "prompts.safetensors"
    tk.save_prompts(model, path)
    fresh = tk.load_prompts(plain_model(name), path)
    assert torch.equal(features(fresh(x)), out)
    assert torch.equal(tk.get_matching_loss(fresh), tk.get_matching_loss(model))

    tk.remove_prompts(model)
    assert type(model) is cls and set(model.state_dict()) == keys and model.config.id2label == labels
    if head:
        assert model.classifier is head and model.num_labels == 7
    assert torch.equal(features(model(x)), before)


@pytest.mark.parametrize("name", MAIN)
def test_vpt_equals_the_layers_on_tokens_and_prompts_and_is_removed(name):
    model = plain_model(name)
    x = images()
    before, keys = features(model(x)), set(model.state_dict())
    plain = copy.deepcopy(model)
    tk.apply_vpt(model, num_prompts=3, num_classes=5 if has_head(model) else None)
    if has_head(model):
        plain.classifier = model.classifier
    out = features(model(x))
    handles = []
    for layer, prompted_layer in zip(layers(plain), layers(model), strict=True):
        def before_layer(module, args, kwargs, prompts=prompted_layer.vpt_prompts):
            hidden, *rest = args
            return (torch.cat([hidden, prompts.expand(hidden.shape[0], -1, -1)], dim=1), *rest), kwargs

        def after_layer(module, args, kwargs, result, P=prompted_layer.vpt_prompts.shape[0]):
            return result[:, :args[0].shape[1] - P]  # args: as the pre-hook left them

        handles += [layer.register_forward_pre_hook(before_layer, with_kwargs=True),
                    layer.register_forward_hook(after_layer, with_kwargs=True)]
    ref = features(plain(x))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    out.square().sum().backward()
    assert layers(model)[0].vpt_prompts.grad.abs().sum() > 0
    tk.remove_prompts(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(features(model(x)), before)


def test_compile_fullgraph_vit():
    model = tk.apply_tcpa(plain_model("vit_classifier").float(), backend="torch", num_classes=5, **POOLS, **TOPK)
    x = images().float()
    eager = model(x).logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    (out.sum() + tk.get_matching_loss(model)).backward()
    assert model.vit.layers[0].tcpa.prompts_img.grad.abs().sum() > 0


def test_hidden_states_pickle_and_random_selection():
    model = tk.apply_tcpa(plain_model("vit"), backend="torch", **POOLS, **TOPK)
    x = images()
    copied = pickle.loads(pickle.dumps(model))  # before output_hidden_states: its hooks do not pickle
    out = model(x, output_hidden_states=True)
    assert type(copied) is type(model) and torch.equal(copied(x).last_hidden_state, out.last_hidden_state)
    assert len(out.hidden_states) == 3 and all(h.shape[1] == 17 for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], layers(model)[-1](out.hidden_states[-2]))
    vpt = tk.apply_vpt(plain_model("vit"), num_prompts=2)
    assert [h.shape[1] for h in vpt(x, output_hidden_states=True).hidden_states] == [17] * 3
    tk.set_selection(model, "random")
    assert model(x).last_hidden_state.shape == out.last_hidden_state.shape
    assert tk.get_matching_loss(model) == 0


def test_clear_errors():
    x = images()
    mask = torch.ones(2, 17)
    mask[:, 5] = 0
    model = tk.apply_tcpa(plain_model("vit"), backend="torch", **POOLS, **TOPK)
    with pytest.raises(ValueError, match="attention_mask: prompted layers take no attention mask"):
        model(x, attention_mask=mask)
    # a bool mask that masks nothing (what transformers builds under torch.compile with some torch versions) is
    # no mask; one that masks something is refused
    everything = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    torch.testing.assert_close(model(x, attention_mask=everything).last_hidden_state, model(x).last_hidden_state,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask: prompted layers take no attention mask"):
        model(x, attention_mask=everything.index_fill(-1, torch.tensor([3]), False))
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    vpt = tk.apply_vpt(plain_model("vit"), num_prompts=2)
    with pytest.raises(ValueError, match="attention_mask"):
        vpt(x, attention_mask=mask)
    for name in ("vit", "siglip_vision"):
        for apply in (tk.apply_tcpa, tk.apply_vpt):
            plain = plain_model(name)
            cls, keys = type(plain), set(plain.state_dict())
            kwargs = dict(num_prompts=2) if apply is tk.apply_vpt else {}
            with pytest.raises(ValueError, match="num_classes: .* has no classification head.*got 3"):
                apply(plain, num_classes=3, **kwargs)
            assert type(plain) is cls and not hasattr(plain, "prompt_state")
            assert set(plain.state_dict()) == keys and all(p.requires_grad for p in plain.parameters())


# ------------------------------------------------------------------------------ config, save_pretrained, subclasses

# name -> (model class, config factory): models built from a config object that other models share
SHARED_CONFIG = {
    "vit_classifier": (ViTForImageClassification, lambda: ViTConfig(**SMALL, intermediate_size=64, **LABELS)),
    # the vision model holds a sub-config of the model's config
    "clip_classifier": (CLIPForImageClassification, lambda: CLIPConfig(vision_config=CLIP_VISION,
                                                                       attn_implementation="sdpa", **LABELS)),
}


def held_configs(model):
    """{module name: the transformers config it holds} for every module of the model that holds one."""
    return {name: module.config for name, module in model.named_modules()
            if isinstance(vars(module).get("config"), transformers.PretrainedConfig)}


@pytest.mark.parametrize("name", SHARED_CONFIG)
def test_num_classes_leaves_the_shared_config_alone_and_remove_gives_the_configs_back(name):
    model_class, make_config = SHARED_CONFIG[name]
    config = make_config()
    model = model_class(config)
    held = held_configs(model)
    tk.apply_tcpa(model, backend="torch", num_classes=10, **POOLS, **TOPK)
    assert model.config.num_labels == model.num_labels == model.classifier.out_features == 10
    assert config.num_labels == 7 and config.id2label == LABELS["id2label"]
    second = model_class(config)
    assert second.num_labels == second.classifier.out_features == 7
    # every module holds the model's copy, shared as the originals were (the inner model reads model.config's flags)
    own = {id(model.config)} | {id(getattr(model.config, key)) for key in model.config.sub_configs}
    assert all(c is not held[n] and id(c) in own for n, c in held_configs(model).items())
    assert set(held_configs(model)) == set(held)
    tk.remove_prompts(model)
    assert all(c is held[n] for n, c in held_configs(model).items()) and model.config is config
    assert model.num_labels == model.classifier.out_features == 7 and config.num_labels == 7


@pytest.mark.parametrize("method", ["tcpa", "vpt"])
def test_save_pretrained_of_a_prompted_model_is_refused_and_works_after_remove(method, tmp_path):
    model = plain_model("vit_classifier")
    x = images()
    if method == "tcpa":
        tk.apply_tcpa(model, backend="torch", num_classes=5, **POOLS, **TOPK)
    else:
        tk.apply_vpt(model, num_prompts=2, num_classes=5)
    refusal = (r"model: {} expects a ViTForImageClassification without prompts, got one with " + method +
               r" prompts .*tk\.save_pretrained\(model, dir\).*tk\.save_prompts.*tk\.remove_prompts")
    with pytest.raises(ValueError, match=refusal.format("save_pretrained")):
        model.save_pretrained(tmp_path / "prompted")
    with pytest.raises(ValueError, match=refusal.format("push_to_hub")):
        model.push_to_hub("user/never-pushed")  # refused before it creates the repository
    assert not (tmp_path / "prompted").exists()
    tk.remove_prompts(model)
    model.save_pretrained(tmp_path / "plain")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "plain", dtype=torch.float64).eval()
    assert loaded.config.id2label == LABELS["id2label"]
    assert torch.equal(loaded(x).logits, model(x).logits)


class UserViTModel(ViTModel):
    """A user's subclass of a supported class, defined outside transformers."""


class UserViTForImageClassification(ViTForImageClassification):
    """A user's subclass of a supported image-classification class."""


@pytest.mark.parametrize("subclass", [UserViTModel, UserViTForImageClassification])
def test_a_subclass_is_prompted_as_its_base_class(subclass, tmp_path):
    """Same weights and prompts: bit-identical outputs and hidden states (fp64, torch backend, one thread)."""
    base = subclass.__bases__[0]
    config = ViTConfig(**SMALL, intermediate_size=64, **LABELS)
    head = dict(num_classes=5) if issubclass(base, ViTForImageClassification) else {}
    torch.manual_seed(0)
    reference = tk.apply_tcpa(base(config).double().eval(), backend="torch", **head, **POOLS, **TOPK)
    model = tk.apply_tcpa(subclass(config).double().eval(), backend="torch", **head, **POOLS, **TOPK)
    model.load_state_dict(reference.state_dict())  # the same backbone, prompts, keys and head
    assert isinstance(model, subclass) and type(model).__name__ == f"Prompted{subclass.__name__}"
    x = images()
    expected, out = reference(x, output_hidden_states=True), model(x, output_hidden_states=True)
    assert torch.equal(features(out), features(expected))
    assert out.hidden_states is not None and len(out.hidden_states) == len(expected.hidden_states) == 3
    assert all(torch.equal(h, e) for h, e in zip(out.hidden_states, expected.hidden_states, strict=True))
    assert torch.equal(tk.get_matching_loss(model), tk.get_matching_loss(reference))
    with pytest.raises(ValueError, match=f"save_pretrained expects a {subclass.__name__} without prompts"):
        model.save_pretrained(tmp_path)
    tk.remove_prompts(model)
    assert type(model) is subclass and model.config.num_labels == 7


def test_a_subclass_in_a_fresh_process_finds_its_base_integration():
    """A user's module imports no integration: the model's base classes lead to the transformers one."""
    script = f"""
import torch, tcpa_kernels as tk
from transformers import ViTConfig, ViTModel

class MyViT(ViTModel):
    pass

model = tk.apply_tcpa(MyViT(ViTConfig(**{SMALL!r}, intermediate_size=64)), backend="torch", **{POOLS!r}, **{TOPK!r})
out = model(torch.randn(1, 3, 16, 16), output_hidden_states=True)
assert out.hidden_states is not None and len(out.hidden_states) == 3, out.hidden_states
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
