"""Adapter folders (``save_pretrained`` / ``from_pretrained``) with the base model's identity, and prompt files that
hold every prompt, key and head tensor whatever its ``requires_grad`` (small timm and Hugging Face models, CPU,
torch backend)."""

import json

import pytest
import safetensors.torch
import timm
import torch
from safetensors import safe_open

import tcpa_kernels as tk
from tcpa_kernels import checkpoint
from tcpa_kernels.checkpoint import from_pretrained, save_pretrained

POOLS = dict(pool_size_cls=3, pool_size_img=4, topk_cls=2, topk_img=2, prompt_len_cls=2, prompt_len_img=1)
PROMPTS = {  # method -> how it is applied
    "tcpa": lambda model: tk.apply_tcpa(model, backend="torch", num_classes=3, **POOLS),
    "vpt": lambda model: tk.apply_vpt(model, num_prompts=4, num_classes=3),
}


def tiny_vit(img_size=32, depth=2, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=5).eval()


def images(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def trained(model):
    """Prompts, keys and head moved away from their initial values: only a load makes another model equal."""
    with torch.no_grad():
        for p in tk.trainable_parameters(model):
            p.add_(0.1)
    return model


def snapshot(model):
    return (type(model), {k: v.clone() for k, v in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before):
    cls, state, grads = snapshot(model)
    assert cls is before[0] and set(state) == set(before[1]) and grads == before[2]
    assert all(torch.equal(state[k], before[1][k]) for k in state)


@pytest.mark.parametrize("method", PROMPTS)
def test_folder_round_trip_is_bit_identical(method, tmp_path):
    model = trained(PROMPTS[method](tiny_vit()))
    folder = tmp_path / "runs" / "adapter"  # created with its parents
    save_pretrained(model, folder)
    record = json.loads((folder / "prompt_config.json").read_text())
    assert record["method"] == method and record["version"] == tk.__version__
    assert record["config"]["num_classes"] == 3
    assert record["identity"] == {"name": "vit_tiny_patch16_224", "class": "VisionTransformer", "img_size": 32,
                                  "embed_dim": 32, "depth": 2, "num_prefix_tokens": 1}
    # the weights file is the one save_prompts writes, with the same record
    assert checkpoint.read_trainable(folder / "prompts.safetensors", checkpoint.METADATA_KEY)[0] == record
    x = images()
    expected = model(x)
    fresh = from_pretrained(tiny_vit(), folder)
    assert fresh.prompt_state.method == method and torch.equal(fresh(x), expected)
    assert torch.equal(tk.load_prompts(tiny_vit(), folder)(x), expected)  # load_prompts reads a folder too
    assert torch.equal(from_pretrained(tiny_vit(), folder / "prompts.safetensors")(x), expected)  # ... and a file


def test_a_folder_whose_two_files_disagree_is_refused(tmp_path):
    save_pretrained(PROMPTS["tcpa"](tiny_vit()), tmp_path)
    record = json.loads((tmp_path / "prompt_config.json").read_text())
    (tmp_path / "prompt_config.json").write_text(json.dumps({**record, "method": "vpt"}))
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"dir: .*prompt_config.json differs from the record in .*prompts.safetensors"):
        from_pretrained(model, tmp_path)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="check_identity: expected a bool"):
        from_pretrained(model, tmp_path, check_identity="no")


def test_identity_mismatch_is_refused_and_check_identity_false_loads(tmp_path):
    source = trained(PROMPTS["tcpa"](tiny_vit(img_size=32)))
    save_pretrained(source, tmp_path / "adapter")
    tk.save_prompts(source, tmp_path / "prompts.safetensors")
    for arg, path in (("dir", tmp_path / "adapter"), ("path", tmp_path / "prompts.safetensors")):
        for target in (tiny_vit(img_size=48), PROMPTS["tcpa"](tiny_vit(img_size=48))):  # plain, then patched
            before = snapshot(target)
            with pytest.raises(ValueError, match=rf"^{arg}: .*prompts were trained on img_size 32, the model has 48; "
                                                 r"pass check_identity=False to load anyway$"):
                (from_pretrained if arg == "dir" else tk.load_prompts)(target, path)
            assert_unchanged(target, before)
    loaded = from_pretrained(tiny_vit(img_size=48), tmp_path / "adapter", check_identity=False)
    for name, p in checkpoint.prompt_parameters(source).items():
        assert torch.equal(loaded.get_parameter(name), p)
    # VPT-shallow: prompts in block 0 only, the same tensors for any depth; the identity tells the depths apart
    shallow = trained(tk.apply_vpt(tiny_vit(depth=2), num_prompts=4, deep=False))
    save_pretrained(shallow, tmp_path / "shallow")
    deeper = tiny_vit(depth=3)
    before = snapshot(deeper)
    with pytest.raises(ValueError, match="prompts were trained on depth 2, the model has 3;"):
        from_pretrained(deeper, tmp_path / "shallow")
    assert_unchanged(deeper, before)
    assert torch.equal(from_pretrained(deeper, tmp_path / "shallow", check_identity=False).blocks[0].vpt_prompts,
                       shallow.blocks[0].vpt_prompts)


def test_a_file_written_before_the_identity_still_loads(tmp_path):
    source = trained(PROMPTS["tcpa"](tiny_vit(img_size=32)))
    path, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    tk.save_prompts(source, path)
    meta, tensors = checkpoint.read_trainable(path, checkpoint.METADATA_KEY)
    assert meta["identity"]["img_size"] == 32
    with pytest.raises(ValueError, match="img_size 32, the model has 48"):
        tk.load_prompts(tiny_vit(img_size=48), path)
    written_before = {"method": meta["method"], "config": meta["config"]}  # what 0.1.0 wrote: no version, no identity
    safetensors.torch.save_file(tensors, str(old), metadata={checkpoint.METADATA_KEY: json.dumps(written_before)})
    loaded = tk.load_prompts(tiny_vit(img_size=48), old)  # nothing to compare the model with: it loads
    assert torch.equal(loaded.blocks[1].tcpa.prompts_img, source.blocks[1].tcpa.prompts_img)
    x = images()
    assert torch.equal(tk.load_prompts(tiny_vit(), old)(x), source(x))


@pytest.mark.parametrize("method", PROMPTS)
def test_frozen_prompts_and_head_are_saved_and_loaded(method, tmp_path):
    model = trained(PROMPTS[method](tiny_vit()))
    frozen = model.blocks[0].tcpa if method == "tcpa" else model.blocks[0].vpt_prompts
    frozen.requires_grad_(False)  # a common schedule: the first layers' prompts stop training
    model.head.requires_grad_(False)
    path = tmp_path / "prompts.safetensors"
    tk.save_prompts(model, path)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    prefix = "blocks.0.tcpa." if method == "tcpa" else "blocks.0.vpt_prompts"
    assert any(name.startswith(prefix) for name in names) and {"head.weight", "head.bias"} <= names
    assert names == set(checkpoint.prompt_parameters(model))
    x = images()
    assert torch.equal(tk.load_prompts(tiny_vit(), path)(x), model(x))
    # into a patched model whose first layer is frozen as well: the frozen prompts are loaded too
    target = PROMPTS[method](tiny_vit(seed=0))
    (target.blocks[0].tcpa if method == "tcpa" else target.blocks[0].vpt_prompts).requires_grad_(False)
    assert torch.equal(tk.load_prompts(target, path)(x), model(x))


def test_directory_and_missing_paths_give_clear_errors(tmp_path):
    model = PROMPTS["tcpa"](tiny_vit())
    with pytest.raises(ValueError, match=r"path: expected a file name, got the directory .*save_pretrained"):
        tk.save_prompts(model, tmp_path)
    with pytest.raises(ValueError, match=r"path: expected a file in an existing folder, got .*missing.*"
                                         r"save_pretrained"):
        tk.save_prompts(model, tmp_path / "missing" / "prompts.safetensors")
    with pytest.raises(ValueError, match="extra_metadata: key 'tcpa_kernels' is the prompts config's own"):
        save_pretrained(model, tmp_path / "refused", {checkpoint.METADATA_KEY: {}})
    assert not (tmp_path / "refused").exists()  # checked before anything is written
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"dir: expected a folder, got the file .*save_prompts"):
        save_pretrained(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    plain = tiny_vit()
    before = snapshot(plain)
    with pytest.raises(ValueError, match=r"path: expected a save_pretrained folder .* has no prompts.safetensors"):
        tk.load_prompts(plain, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"dir: expected a prompts file or a save_pretrained folder, got .*"
                                                r"nothing, which does not exist"):
        from_pretrained(plain, tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"dir: expected a safetensors file, got .*file"):
        from_pretrained(plain, tmp_path / "file")
    assert_unchanged(plain, before)


def test_hugging_face_identity(tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5.18")  # the integration's floor

    def vit(image_size=32, name=""):
        torch.manual_seed(0)
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=image_size, patch_size=8,
                                        attn_implementation="sdpa")
        config.name_or_path = name
        return transformers.ViTModel(config).eval()

    model = trained(tk.apply_tcpa(vit(), backend="torch", **POOLS))
    save_pretrained(model, tmp_path / "unnamed")
    identity = json.loads((tmp_path / "unnamed" / "prompt_config.json").read_text())["identity"]
    assert identity == {"name": None, "class": "ViTModel", "img_size": 32, "embed_dim": 32, "depth": 2,
                        "num_prefix_tokens": 1}
    x = images()
    assert torch.equal(from_pretrained(vit(), tmp_path / "unnamed")(x).last_hidden_state,
                       model(x).last_hidden_state)
    plain = vit(image_size=48)
    before = snapshot(plain)
    with pytest.raises(ValueError, match="img_size 32, the model has 48"):
        from_pretrained(plain, tmp_path / "unnamed")
    assert_unchanged(plain, before)
    # a named base model (config.name_or_path): another name is refused, an unnamed model is not compared
    model.config.name_or_path = "org/vit-a"
    save_pretrained(model, tmp_path / "named")
    with pytest.raises(ValueError, match="name 'org/vit-a', the model has 'org/vit-b'"):
        from_pretrained(vit(name="org/vit-b"), tmp_path / "named")
    from_pretrained(vit(), tmp_path / "named")


class _Holder(torch.nn.Module):
    """A user's module holding the model (a LightningModule's ``self.model``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_save_and_load_through_a_module_that_holds_the_model(tmp_path):
    """Keys are the plain model's names (no ``model.`` prefix), and a holder of a plain model loads them."""
    model = trained(tk.apply_tcpa(tiny_vit(), num_classes=3))
    tk.save_prompts(_Holder(model), tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(checkpoint.prompt_parameters(model))
    holder = tk.load_prompts(_Holder(tiny_vit()), tmp_path / "p.safetensors")
    x = images()
    assert torch.equal(holder.model(x), model(x))
