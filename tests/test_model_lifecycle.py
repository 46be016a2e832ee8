"""A prompted model in the pipelines people run: whole-model save/load, deepcopy (EMA, best-model copies),
wrappers, torch.compile without recompiles, atomic failures, and arguments of the wrong type."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from timm.utils import ModelEmaV3

import tcpa_kernels as tk
from tcpa_kernels._forward import last_forward
from tests.test_vit import TCPA_KW, images, small_vit

METHODS = {
    "tcpa": lambda model: tk.apply_tcpa(model, backend="torch", num_classes=3, **TCPA_KW),
    "vpt_deep": lambda model: tk.apply_vpt(model, num_prompts=3, num_classes=3),
    "vpt_shallow": lambda model: tk.apply_vpt(model, num_prompts=3, deep=False, num_classes=3),
}


def trained(method):
    """A prompted model after a training forward + backward (its state holds this step's matching loss)."""
    model = METHODS[method](small_vit(reg_tokens=1)).train()
    (model(images()).square().mean() + tk.get_matching_loss(model)).backward()
    return model


def snapshot(model):
    """Everything apply/remove/load may change: classes, parameters (values, flags), buffers, heads, mode."""
    return dict(classes=[type(m) for m in model.modules()], training=[m.training for m in model.modules()],
                params={n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in model.named_parameters()},
                attrs={k for k in vars(model) if not k.startswith("_")} | set(model._modules),
                num_classes=model.num_classes, head=model.head)


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["classes"] == before["classes"] and after["training"] == before["training"]
    assert after["attrs"] == before["attrs"] and after["num_classes"] == before["num_classes"]
    assert after["head"] is before["head"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, flag, dtype) in before["params"].items():
        assert torch.equal(after["params"][name][0], value) and after["params"][name][1:] == (flag, dtype), name


def test_torch_save_load_whole_model_in_this_and_a_fresh_process(tmp_path):
    x = images()
    torch.save(x, tmp_path / "x.pt")
    for method in METHODS:
        model = trained(method).eval()
        torch.save(model, tmp_path / f"{method}.pt")
        torch.save(model(x), tmp_path / f"{method}_expected.pt")
        loaded = torch.load(tmp_path / f"{method}.pt", weights_only=False)
        assert type(loaded) is type(model) and type(loaded.blocks[0]) is type(model.blocks[0])
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    script = """
import sys, torch
x = torch.load(sys.argv[1])
for method in sys.argv[2:]:  # the generated classes, rebuilt by name on load
    model = torch.load(f"{method}.pt", weights_only=False)
    model.train()(x)
    torch.testing.assert_close(model.eval()(x), torch.load(f"{method}_expected.pt"), atol=0, rtol=0)
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), *METHODS], check=True, cwd=tmp_path)


def test_generated_classes_pickle_by_name():
    model = METHODS["tcpa"](small_vit())
    for cls in (type(model), type(model.blocks[0])):
        assert pickle.loads(pickle.dumps(cls)) is cls
    assert type(model).__name__ == "PromptedVisionTransformer" and type(model.blocks[0]).__name__ == "TCPABlock"


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_after_a_training_step_and_timm_ema(method):
    model = trained(method)
    clone = copy.deepcopy(model)
    assert clone.prompt_state is not model.prompt_state
    assert clone.blocks[1]._prompt_layer.state is clone.prompt_state
    x = images()
    torch.testing.assert_close(clone.eval()(x), model.eval()(x), atol=0, rtol=0)
    ema = ModelEmaV3(model.train(), decay=0.5)
    with torch.no_grad():
        for p in tk.trainable_parameters(model):
            p.add_(1.0)
    ema.update(model)
    ema.module(x).sum()  # the EMA copy runs on its own state


def test_copy_keeps_nothing_of_a_forward():
    """Pickling / deepcopy drop the last forward (its graph tensors, prompt K/V and loss terms)."""
    model = trained("tcpa")
    with torch.no_grad():
        model.eval()(images())
    clone = copy.deepcopy(model)
    assert last_forward(clone.prompt_state) is None
    assert last_forward(model.prompt_state) is not None, "the original keeps its own last forward"


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_leaves_nothing_on_modules(method):
    """A module's state is its parameters and config: a training forward + backward and an eval forward add or
    replace no module attribute (no per-forward tensor parked on a block, an attention or a TCPAPrompts)."""
    model = METHODS[method](small_vit(reg_tokens=1))
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    trained_step = model.train()(images()).square().mean() + tk.get_matching_loss(model)
    trained_step.backward()
    with torch.no_grad():
        model.eval()(images())
    for name, m in model.named_modules():
        after = vars(m)
        assert after.keys() == before[name].keys(), f"{name}: {sorted(after.keys() ^ before[name].keys())}"
        changed = [k for k, v in after.items() if k not in ("training", "_parameters", "_buffers", "_modules")
                   and v is not before[name][k]]
        assert not changed, f"{name}: {changed}"


def test_get_matching_loss_of_a_copy_is_its_own():
    model = trained("tcpa")
    clone = copy.deepcopy(model)
    assert tk.get_matching_loss(clone).item() == 0.0  # no forward yet
    clone.eval()(images())
    model.eval()(images())
    torch.testing.assert_close(tk.get_matching_loss(clone), tk.get_matching_loss(model))


@pytest.mark.parametrize("method", METHODS)
def test_forward_intermediates_hold_no_prompts(method):
    model = METHODS[method](small_vit(reg_tokens=1)).eval()
    x = images()
    final, intermediates = model.forward_intermediates(x, indices=2)
    assert [tuple(t.shape) for t in intermediates] == [(2, 32, 4, 4)] * 2  # [B, C, H/4, W/4]: 16 patch tokens
    torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
    (spatial, prefix), = model.get_intermediate_layers(x, n=1, norm=True, return_prefix_tokens=True)
    torch.testing.assert_close(torch.cat([prefix, spatial], 1), final)  # [B, 2 + 16, C]


@pytest.mark.parametrize("compiled", ["model", "loss_function"])
def test_torch_compile_does_not_recompile_between_steps(compiled):
    """The per-layer loss terms change between steps (empty before the first): no guard may depend on them."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = METHODS["tcpa"](small_vit()).train()
    counter = CompileCounter()
    if compiled == "model":
        wrapped = torch.compile(model, backend=counter)
        loss = lambda x: wrapped(x).square().mean() + tk.get_matching_loss(wrapped)
    else:  # the matching loss is read inside the compiled frame
        loss = torch.compile(lambda x: model(x).square().mean() + tk.get_matching_loss(model), backend=counter)
    for step in range(3):
        loss(images(seed=step)).backward()
    assert counter.frame_count == 1


def test_helpers_see_through_torch_compile(tmp_path):
    model = METHODS["tcpa"](small_vit())
    compiled = torch.compile(model, backend="eager")
    tk.save_prompts(compiled, tmp_path / "p.safetensors")
    fresh = tk.load_prompts(small_vit(), tmp_path / "p.safetensors")  # keys without "_orig_mod."
    torch.testing.assert_close(fresh(images()), model(images()))
    assert tk.trainable_parameters(compiled) == tk.trainable_parameters(model)
    assert tk.remove_prompts(compiled) is compiled and not hasattr(model, "prompt_state")
    assert type(model).__name__ == "VisionTransformer"


def test_apply_refuses_a_data_parallel_wrapper_unchanged():
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(ValueError, match="model: add prompts before wrapping the model in DataParallel"):
        tk.apply_tcpa(torch.nn.DataParallel(model), backend="torch", **TCPA_KW)
    assert_unchanged(model, before)


BAD_TCPA_ARGS = [
    (dict(num_classes=-1), ValueError, "num_classes: expected an int >= 0, got -1"),
    (dict(num_classes=2.0), ValueError, "num_classes: expected an int >= 0, got 2.0"),
    (dict(num_classes=True), ValueError, "num_classes: expected an int >= 0, got True"),
    (dict(renormalize="False"), TypeError, "renormalize: expected a bool"),
    (dict(prompt_dropout=1.0), ValueError, r"prompt_dropout: expected a finite number in \[0.0, 1.0\)"),
    (dict(prompt_dropout=True), ValueError, "prompt_dropout: .* got True"),
    (dict(pool_size_cls=3.0), ValueError, "pool_size_cls: expected an int >= 1, got 3.0"),
    (dict(topk_img=True), ValueError, r"topk_img: expected an int in \[1, 5\], got True"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize(("override", "error", "words"), BAD_TCPA_ARGS)
def test_bad_apply_tcpa_argument_leaves_model_unchanged(override, error, words):
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(error, match=words):
        tk.apply_tcpa(model, **(TCPA_KW | dict(backend="torch") | override))
    assert_unchanged(model, before)


@pytest.mark.parametrize(("override", "error", "words"), [
    (dict(num_prompts=2.0), ValueError, "num_prompts: expected an int >= 1, got 2.0"),
    (dict(deep=1), TypeError, "deep: expected a bool"),
    (dict(num_classes="3"), ValueError, "num_classes: expected an int >= 0, got '3'"),
])
def test_bad_apply_vpt_argument_leaves_model_unchanged(override, error, words):
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(error, match=words):
        tk.apply_vpt(model, **(dict(num_prompts=2) | override))
    assert_unchanged(model, before)


def test_failure_while_patching_is_undone(monkeypatch):
    model = small_vit().train()

    def broken(*args, **kwargs):
        raise RuntimeError("head could not be built")

    monkeypatch.setattr(model, "reset_classifier", broken)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="head could not be built"):
        tk.apply_tcpa(model, backend="torch", num_classes=3, **TCPA_KW)
    assert_unchanged(model, before)


def test_checkpoint_that_does_not_fit_leaves_model_unchanged(tmp_path):
    source = METHODS["tcpa"](small_vit())
    tk.save_prompts(source, tmp_path / "p.safetensors")
    other_width = small_vit(embed_dim=48)  # same config, keys of another shape
    before = snapshot(other_width)
    with pytest.raises(ValueError, match=r"path: blocks.0.tcpa.keys_cls has shape \(3, 32\), model expects \(3, 48\)"):
        tk.load_prompts(other_width, tmp_path / "p.safetensors")
    assert_unchanged(other_width, before)
    patched = METHODS["tcpa"](small_vit(embed_dim=48))
    before = snapshot(patched)
    with pytest.raises(ValueError, match="has shape"):
        tk.load_prompts(patched, tmp_path / "p.safetensors")
    assert_unchanged(patched, before)


@pytest.mark.parametrize("move", ["half", "double"])
def test_remove_prompts_restores_head_in_the_current_dtype(move):
    model = small_vit()
    original_head = model.head
    METHODS["tcpa"](model)
    getattr(model, move)()
    tk.remove_prompts(model)
    assert model.head is original_head and model.head.weight.dtype == model.patch_embed.proj.weight.dtype
    assert type(model).__name__ == "VisionTransformer" and type(model.blocks[0]).__name__ == "Block"


def test_train_mode_must_be_a_bool():
    model = METHODS["tcpa"](small_vit())
    with pytest.raises(TypeError, match="mode: expected a bool"):
        model.train("False")


def test_load_prompts_reads_files_with_the_earlier_parameter_names(tmp_path):
    """Files written before the per-layer module (blocks.{i}.tcpa_keys_cls ...) still load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = METHODS["tcpa"](small_vit())
    tk.save_prompts(source, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors = {name.replace("tcpa.", "tcpa_"): t for name, t in load_file(tmp_path / "new.safetensors").items()}
    assert "blocks.0.tcpa_keys_cls" in tensors
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)  # same config, the earlier names
    loaded = tk.load_prompts(small_vit(), tmp_path / "old.safetensors")
    assert torch.equal(loaded(images()), source(images()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_model_and_its_forwards_are_freed_together(method, grad):
    """A forward that no backward follows (an evaluation without no_grad, a forward whose loss is never used) keeps
    nothing alive once the model and its outputs are dropped: no block, no activation. What a forward hands on with
    the hidden states (its K/V) holds no tensor whose graph runs back through them, and its record lives on the model,
    so no reference cycle runs through the autograd graph, which the garbage collector cannot see."""
    import gc
    import weakref

    model = METHODS[method](small_vit(reg_tokens=1))
    with torch.set_grad_enabled(grad):
        out = model(images())
        loss = tk.get_matching_loss(model)
    refs = [weakref.ref(model.blocks[0]), weakref.ref(model.blocks[1].mlp.fc1.weight), weakref.ref(out)]
    del model, out, loss
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
