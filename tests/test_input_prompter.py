"""The input prompter (``apply_tcpa(..., input_prompter=True)``): the published image-space prompter against a
plain-PyTorch reference in fp64, and on every model family: it runs on the image before the patch embedding, trains,
is saved and loaded with the prompts, ``remove_prompts`` / ``disable_prompts`` give the original model back bit for
bit, and the model pickles, deep-copies and compiles whole."""

import copy
import dataclasses
import json
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tcpa_kernels as tk
from tcpa_kernels.checkpoint import METADATA_KEY, prompt_parameters, read_trainable
from tcpa_kernels.integrations.input_prompter import InputPrompter
from tcpa_kernels.integrations.models import MODEL_FAMILIES, model_family
from tests._helpers import TIMM_FAMILIES
from tests.test_vit import TCPA_KW, images, small_vit

PROMPTER_PARAMS = ("conv1.weight", "conv1.bias", "prelu.weight", "conv2.weight", "conv2.bias")


def input_prompter_ref(x: torch.Tensor, conv1_weight, conv1_bias, prelu_weight, conv2_weight,
                       conv2_bias) -> torch.Tensor:
    """The published prompter in plain PyTorch: x [B, 3, H, W] + conv2(prelu(conv1(x))), "same" padding."""
    padding = conv1_weight.shape[-1] // 2
    h = F.prelu(F.conv2d(x, conv1_weight, conv1_bias, padding=padding), prelu_weight)  # [B, 9, H, W]
    return x + F.conv2d(h, conv2_weight, conv2_bias, padding=padding)  # [B, 3, H, W]


def test_input_prompter_matches_reference_fp64():
    torch.manual_seed(0)
    prompter = InputPrompter().double()
    assert [tuple(p.shape) for p in prompter.parameters()] == [(9, 3, 11, 11), (9,), (1,), (3, 9, 11, 11), (3,)]
    with torch.no_grad():
        prompter.prelu.weight.fill_(-0.3)  # a slope other than the default 0.25: a swapped sign would show
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64, requires_grad=True)  # odd, unequal sides
    out = prompter(x)
    ref = input_prompter_ref(x, *[prompter.get_parameter(name) for name in PROMPTER_PARAMS])
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    weight = torch.randn_like(out)  # a loss that weighs every output element differently
    inputs = [x, *prompter.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, g, rg in zip(["x", *PROMPTER_PARAMS], grads, ref_grads):
        assert rg.abs().sum() > 0, name
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(kernel_size=4), r"kernel_size: expected an odd int \('same' padding keeps H and W\), got 4"),
    (dict(channels=0), r"channels: expected an int >= 1, got 0"),
    (dict(hidden_channels=2.0), r"hidden_channels: expected an int >= 1, got 2.0"),
])
def test_input_prompter_arguments_are_checked(kwargs, words):
    with pytest.raises(ValueError, match=words):
        InputPrompter(**kwargs)


# ------------------------------------------------------------------------------------------------- every family


def timm_model(name):
    torch.manual_seed(0)
    return TIMM_FAMILIES[name]().eval()


def hugging_face(name):
    def make():
        pytest.importorskip("transformers", minversion="5.18")
        from tests.test_hf import plain_model

        return plain_model(name)

    return make


def open_clip_model(name):
    def make():
        pytest.importorskip("open_clip")
        from tests.test_open_clip import plain_model

        return plain_model(name)

    return make


def call(model, x):
    return model(x)


def hf_call(model, x):
    from tests.test_hf import features

    return features(model(pixel_values=x))


def encode_image(model, x):
    return model.encode_image(x)


# name -> (plain model, its output for images x, options of apply_tcpa): every patch embedding kind (timm PatchEmbed,
# Hugging Face patch-embedding module and bare Conv2d, open_clip conv1 of a tower or a CLIP, a timm trunk in a CLIP)
FAMILIES = {
    "timm_vit": (lambda: small_vit(), call, dict(num_classes=3)),
    "timm_eva02": (lambda: timm_model("eva02"), call, dict(num_classes=3)),
    "hf_vit_classifier": (hugging_face("vit_classifier"), hf_call, dict(num_classes=3)),
    "hf_clip_vision": (hugging_face("clip_vision"), hf_call, {}),
    "open_clip_tower": (open_clip_model("tower"), call, {}),
    "open_clip_clip": (open_clip_model("clip"), encode_image, {}),
    "open_clip_timm_trunk": (open_clip_model("clip_timm_trunk"), encode_image, {}),
}


def family_images(model):
    size = 48 if hasattr(getattr(model, "visual", None), "trunk") else 16
    return images(size=size).to(next(model.parameters()).dtype)


def prompted(plain, options, input_prompter=True, method="tcpa", seed=5):
    """A prompted copy of ``plain`` (the same prompts and head for the same seed, with or without the prompter)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(plain)
    if method == "vpt":
        return tk.apply_vpt(model, num_prompts=3, input_prompter=input_prompter, **options)
    return tk.apply_tcpa(model, backend="torch", input_prompter=input_prompter, **TCPA_KW, **options)


def patch_embedding(model):
    return model_family(model).patch_embedding(model)


def perturb(model):
    """Change every saved tensor (the prompter's default init and the prompts' would hide a tensor not loaded)."""
    with torch.no_grad():
        for p in prompt_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    return model


def snapshot(model):
    """Classes, train flags and every parameter (value, requires_grad) and buffer of a model."""
    return (dict(classes=[type(m) for m in model.modules()], training=[m.training for m in model.modules()],
                 params={n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}),
            {n: b.clone() for n, b in model.named_buffers()})


def assert_same(after, before):
    (a, a_buffers), (b, b_buffers) = after, before
    assert a["classes"] == b["classes"] and a["training"] == b["training"]
    assert a["params"].keys() == b["params"].keys() and a_buffers.keys() == b_buffers.keys()
    for name, (value, flag) in b["params"].items():
        assert torch.equal(a["params"][name][0], value) and a["params"][name][1] == flag, name
    assert all(torch.equal(a_buffers[name], value) for name, value in b_buffers.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prompter_runs_on_the_image_before_the_patch_embedding_and_trains(family):
    make, forward, options = FAMILIES[family]
    plain = make()
    x = family_images(plain)
    model, without = prompted(plain, options), prompted(plain, options, input_prompter=False)
    prompter = patch_embedding(model).input_prompter
    assert isinstance(prompter, InputPrompter) and type(patch_embedding(model)).__name__.startswith("InputPrompted")
    assert torch.equal(forward(model, x), forward(without, prompter(x)))  # same prompts and head, prompted image
    assert not torch.equal(forward(model, x), forward(without, x))
    trainable = tk.trainable_parameters(model)
    assert all(any(p is q for q in trainable) for p in prompter.parameters())
    assert tk.count_parameters(model)[0] == tk.count_parameters(without)[0] + sum(p.numel()
                                                                               for p in prompter.parameters())
    forward(model.train(), x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompter.parameters())
    assert prompter.training and not patch_embedding(model).training  # the backbone stays in eval mode
    assert not model.eval().prompt_state.training and not prompter.training


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()  # nn.MultiheadAttention (open_clip) takes its fast path only without parameters that need grads
def test_remove_prompts_and_disable_prompts_give_the_original_model_bit_identically(family):
    make, forward, options = FAMILIES[family]
    plain = make()
    x = family_images(plain)
    model = copy.deepcopy(plain)
    original, before = forward(model, x), snapshot(model)
    torch.manual_seed(5)
    tk.apply_tcpa(model, backend="torch", input_prompter=True, **TCPA_KW, **options)
    perturb(model)
    with_prompts, prompted_snapshot = forward(model, x), snapshot(model)
    with tk.disable_prompts(model):
        assert torch.equal(forward(model, x), original)
    assert_same(snapshot(model), prompted_snapshot)
    assert torch.equal(forward(model, x), with_prompts)
    tk.remove_prompts(model)
    assert_same(snapshot(model), before)
    assert "input_prompter" not in dict(model.named_modules()) and torch.equal(forward(model, x), original)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_is_bit_identical(family, tmp_path):
    make, forward, options = FAMILIES[family]
    plain = make()
    x = family_images(plain)
    model = perturb(prompted(plain, options))
    tk.save_prompts(model, tmp_path / "p.safetensors")
    saved = read_trainable(tmp_path / "p.safetensors", METADATA_KEY)[1]
    prompter_keys = {name for name in saved if ".input_prompter." in name}
    assert {name.rsplit("input_prompter.", 1)[1] for name in prompter_keys} == set(PROMPTER_PARAMS)
    fresh = tk.load_prompts(make(), tmp_path / "p.safetensors")  # a freshly built plain model
    assert fresh.prompt_state.config.input_prompter
    assert torch.equal(forward(fresh, x), forward(model, x))
    tk.save_pretrained(model, tmp_path / "adapter")
    assert torch.equal(forward(tk.from_pretrained(make(), tmp_path / "adapter"), x), forward(model, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_and_deepcopy(family):
    make, forward, options = FAMILIES[family]
    plain = make()
    x = family_images(plain)
    model = perturb(prompted(plain, options))
    expected = forward(model, x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert clone.prompt_state.input_site is patch_embedding(clone) is not patch_embedding(model)
        assert type(patch_embedding(clone)) is type(patch_embedding(model))
        assert torch.equal(forward(clone, x), expected)


def test_timm_models_save_whole_and_load_in_a_fresh_process(tmp_path):
    x = images()
    for method in ("tcpa", "vpt"):
        model = perturb(prompted(small_vit(), dict(num_classes=3), method=method))
        torch.save(model, tmp_path / f"{method}.pt")
        torch.save((x, model(x)), tmp_path / f"{method}_expected.pt")
    script = """
import torch
for method in ("tcpa", "vpt"):
    model = torch.load(f"{method}.pt", weights_only=False)  # the generated patch-embedding class, rebuilt by name
    x, expected = torch.load(f"{method}_expected.pt")
    assert type(model.patch_embed).__name__ == "InputPromptedPatchEmbed"
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_torch_compile_fullgraph():
    model = prompted(small_vit(), dict(num_classes=3))
    x = images()
    eager = model(x)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager)
    out.square().sum().backward()
    assert model.patch_embed.input_prompter.conv1.weight.grad is not None


def test_files_without_the_option_load_and_configs_must_agree(tmp_path):
    """A file written before ``input_prompter`` existed loads without a prompter; a file with the prompter is refused
    by a model patched without it."""
    from safetensors.torch import save_file

    model = perturb(prompted(small_vit(), dict(num_classes=3), input_prompter=False))
    tk.save_prompts(model, tmp_path / "new.safetensors")
    meta, tensors = read_trainable(tmp_path / "new.safetensors", METADATA_KEY)
    del meta["config"]["input_prompter"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={METADATA_KEY: json.dumps(meta)})
    old = tk.load_prompts(small_vit(), tmp_path / "old.safetensors")
    assert not old.prompt_state.config.input_prompter and old.prompt_state.input_site is None
    assert torch.equal(old(images()), model(images()))
    tk.save_prompts(perturb(prompted(small_vit(), dict(num_classes=3))), tmp_path / "prompter.safetensors")
    with pytest.raises(ValueError, match=r"path: checkpoint holds tcpa \{.*'input_prompter': True.*model has tcpa"):
        tk.load_prompts(old, tmp_path / "prompter.safetensors")


class NoPatchEmbedding(VisionTransformer):
    """A ViT whose family (registered in the test) has no patch embedding."""


def test_a_family_without_patch_embedding_and_bad_values_are_refused_unchanged(monkeypatch):
    from tests.test_model_lifecycle import assert_unchanged
    from tests.test_model_lifecycle import snapshot as timm_snapshot

    model = small_vit()
    before = timm_snapshot(model)
    with pytest.raises(TypeError, match=r"input_prompter: expected a bool \(True or False\), got 'yes' \(str\)"):
        tk.apply_tcpa(model, backend="torch", input_prompter="yes", **TCPA_KW)
    with pytest.raises(TypeError, match=r"input_prompter: expected a bool \(True or False\), got 1 \(int\)"):
        tk.apply_vpt(model, num_prompts=2, input_prompter=1)
    assert_unchanged(model, before)

    family = dataclasses.replace(model_family(small_vit()), name="test family", patch_embedding=lambda m: None)
    monkeypatch.setitem(MODEL_FAMILIES, NoPatchEmbedding, family)
    torch.manual_seed(0)
    model = NoPatchEmbedding(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=7).eval()
    before = timm_snapshot(model)
    with pytest.raises(ValueError, match=r"input_prompter: expected False for a test family \(NoPatchEmbedding\), "
                                         r"which has no patch embedding to run the input prompter before, got True"):
        tk.apply_tcpa(model, backend="torch", input_prompter=True, **TCPA_KW)
    assert_unchanged(model, before)
    tk.remove_prompts(tk.apply_tcpa(model, backend="torch", **TCPA_KW))  # without the prompter: as before
