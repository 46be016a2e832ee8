"""The library surface PEFT, timm and Lightning users expect: helpers that find the prompted model inside a user's
module, the kernel backend checked where the kernels run, PEFT's parameter counts, ``disable_prompts`` and configs
passed whole."""

import dataclasses
import sys
import typing

import pytest
import torch
from torch import nn

import tcpa_kernels as tk
import tcpa_kernels._backend
from tcpa_kernels._backend import resolve_backend
from tcpa_kernels.vit import (
    TCPAConfig,
    VPTConfig,
    count_parameters,
    disable_prompts,
    find_model,
    print_trainable_parameters,
    state_of,
)
from tests._helpers import TIMM_FAMILIES
from tests.test_model_lifecycle import assert_unchanged, snapshot
from tests.test_vit import TCPA_KW, images, small_vit

METHODS = {
    "tcpa_new_head": lambda model: tk.apply_tcpa(model, backend="torch", num_classes=3, **TCPA_KW),
    "tcpa": lambda model: tk.apply_tcpa(model, backend="torch", **TCPA_KW),
    "vpt_deep": lambda model: tk.apply_vpt(model, num_prompts=3, num_classes=3),
    "vpt_shallow": lambda model: tk.apply_vpt(model, num_prompts=3, deep=False),
}


class LitLike(nn.Module):
    """A user's module holding the model, as a LightningModule does (``self.model``), with a module of its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.extra = nn.Linear(2, 2)

    def forward(self, x):
        return self.model(x)


class Distill(nn.Module):
    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher


# ------------------------------------------------------------------------------- a user's module holding the model


@pytest.mark.parametrize("holding", ["plain", "compiled", "data_parallel"])
def test_helpers_find_the_prompted_model_in_a_users_module(holding):
    model = METHODS["tcpa_new_head"](small_vit())
    held = {"plain": lambda m: m, "compiled": lambda m: torch.compile(m, backend="eager"),
            "data_parallel": nn.DataParallel}[holding](model)
    lit = LitLike(held)
    assert find_model(lit) is model and state_of(lit) is model.prompt_state
    lit(images())
    assert tk.get_matching_loss(lit) is tk.get_matching_loss(model) and tk.get_matching_loss(lit) > 0
    assert tk.trainable_parameters(lit) == tk.trainable_parameters(model)
    assert count_parameters(lit) == count_parameters(model)
    assert tk.set_selection(lit, "random") is lit and all(blk.tcpa.selection_mode == "random" for blk in model.blocks)
    with disable_prompts(lit):
        assert torch.equal(lit(images()), small_vit()(images()))
    assert tk.remove_prompts(lit) is lit and type(model).__name__ == "VisionTransformer"
    assert lit.model is held and not hasattr(model, "prompt_state")


def test_helpers_name_the_attributes_that_hold_prompted_models():
    two = Distill(METHODS["tcpa"](small_vit()), torch.compile(METHODS["vpt_deep"](small_vit()), backend="eager"))
    several = r"model: expected one model patched by apply_tcpa/apply_vpt, got Distill, which holds several, at " \
              r"\.student, \.teacher: pass one of them"
    for helper in (tk.trainable_parameters, tk.get_matching_loss, tk.remove_prompts, count_parameters, state_of,
                   find_model, lambda m: tk.set_selection(m, "topk")):
        with pytest.raises(ValueError, match=several):
            helper(two)
    assert find_model(Distill(two.student, small_vit())) is two.student  # a plain ViT beside it: one prompted model
    none = r"model: expected a model patched by apply_tcpa/apply_vpt, or a module holding one, got LitLike, and " \
           r"neither it nor any of its submodules has prompts: pass the model they returned"
    for helper in (tk.trainable_parameters, tk.remove_prompts, print_trainable_parameters):
        with pytest.raises(ValueError, match=none):
            helper(LitLike(small_vit()))
    with pytest.raises(ValueError, match=r"got LitLike without prompts"):  # nor TCPAPrompts modules
        tk.get_matching_loss(LitLike(small_vit()))
    plain = small_vit()
    assert find_model(LitLike(plain), prompted=False) is plain


@pytest.mark.parametrize("apply", [lambda m: tk.apply_tcpa(m, backend="torch"),
                                   lambda m: tk.apply_vpt(m, num_prompts=2)], ids=["tcpa", "vpt"])
def test_apply_to_a_users_module_names_the_attribute_to_pass(apply):
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model: expected a timm VisionTransformer .*, got "
                                        r"tests\.test_model_surface\.LitLike; it holds one at \.model: pass that$"):
        apply(LitLike(model))
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"got tests\.test_model_surface\.Distill; it holds several, at \.student, "
                                        r"\.teacher: pass one of them$"):
        apply(Distill(model, small_vit()))
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"got torch\.nn\.modules\.linear\.Linear$"):  # holding none: as before
        apply(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------- backend="triton", checked late


def test_triton_backend_is_checked_at_the_forward_not_when_prompts_are_added(monkeypatch, tmp_path):
    """A model built on the CPU with backend="triton" (then moved to a GPU) gets its prompts, and a file saved with
    that backend loads into a fresh CPU model; a forward on CPU tensors without the Triton interpreter is refused."""
    pytest.importorskip("triton")
    monkeypatch.setattr(tcpa_kernels._backend, "interpreter_enabled", lambda: False)  # as without TRITON_INTERPRET
    interpreter_off = r"backend='triton' got tensors on cpu; .*export TRITON_INTERPRET=1"
    with pytest.raises(ValueError, match=interpreter_off):
        resolve_backend("triton", torch.device("cpu"))
    model = tk.apply_tcpa(small_vit(), backend="triton", num_classes=3, **TCPA_KW)
    assert state_of(model).config.backend == "triton"
    with pytest.raises(ValueError, match=interpreter_off):
        model(images())
    tk.save_prompts(model, tmp_path / "p.safetensors")
    fresh = tk.load_prompts(small_vit(), tmp_path / "p.safetensors")
    assert state_of(fresh).config == state_of(model).config
    with pytest.raises(ValueError, match=interpreter_off):
        fresh(images())


# ------------------------------------------------------------------------------------------------ PEFT conveniences


def test_count_and_print_trainable_parameters_as_peft(capsys):
    model = METHODS["tcpa_new_head"](small_vit())
    plain = sum(p.numel() for p in small_vit().parameters())
    prompts = 2 * 32 * (3 + 5 + 3 * 2 + 5 * 1)  # 2 blocks, C=32: keys [3, C], [5, C]; prompts [3, 2, C], [5, 1, C]
    trainable = prompts + 32 * 3 + 3  # and the new head
    assert count_parameters(model) == (trainable, plain - (32 * 7 + 7) + trainable) == (1315, 28931)
    print_trainable_parameters(LitLike(model))
    assert capsys.readouterr().out == "trainable params: 1,315 || all params: 28,931 || trainable%: 4.5453\n"


def timm_model(family, seed=0):
    torch.manual_seed(seed)
    return TIMM_FAMILIES[family]().eval()


@pytest.mark.parametrize(("family", "method"), [(family, method) for family in TIMM_FAMILIES
                                                 for method in ("tcpa_new_head", "vpt_deep")]
                         + [("vit_block", "tcpa"), ("vit_block", "vpt_shallow")])
def test_disable_prompts_runs_the_original_timm_model_bit_identically(family, method):
    x = images()
    model = timm_model(family)
    original = model(x)
    METHODS[method](model)
    prompted = model(x)
    before = snapshot(model)
    with disable_prompts(model) as yielded:
        assert yielded is model
        assert torch.equal(model(x), original)
    assert_unchanged(model, before)
    assert torch.equal(model(x), prompted)
    if method != "tcpa":  # (a kept head trains: it is the same head as the original one only before training)
        tk.remove_prompts(model)
        assert torch.equal(model(x), original)


def test_disable_prompts_restores_the_model_when_the_body_raises():
    model = METHODS["tcpa_new_head"](small_vit())
    x = images()
    prompted = model(x)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="in the body"):
        with disable_prompts(model):
            raise RuntimeError("in the body")
    assert_unchanged(model, before)
    assert torch.equal(model(x), prompted) and not state_of(model).disabled


def test_disable_prompts_nests_and_refuses_what_needs_the_prompted_model(tmp_path):
    model = METHODS["tcpa_new_head"](small_vit())
    original = small_vit()(images())
    model(images())
    loss = tk.get_matching_loss(model)
    with disable_prompts(model):
        with disable_prompts(model):
            assert torch.equal(model(images()), original)
        assert torch.equal(model(images()), original)  # the inner context restored nothing
        assert tk.get_matching_loss(model) is loss  # the last forward with prompts
        refused = r"model: expected a model with its prompts enabled, got PromptedVisionTransformer inside `with " \
                  r"disable_prompts\(model\)`; call this after the with block"
        for helper in (tk.trainable_parameters, tk.remove_prompts, count_parameters,
                       lambda m: tk.save_prompts(m, tmp_path / "p.safetensors")):
            with pytest.raises(ValueError, match=refused):
                helper(model)
    assert len(tk.trainable_parameters(model)) == 10


def test_disable_prompts_under_torch_compile_compiles_once_more():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x = images()
    original = small_vit()(x)
    compiled = torch.compile(METHODS["tcpa_new_head"](small_vit()), backend=counter)
    prompted = compiled(x)
    for _ in range(2):
        with disable_prompts(compiled):
            assert torch.equal(compiled(x), original)
        assert torch.equal(compiled(x), prompted)
    assert counter.frame_count == 2


@pytest.mark.parametrize("name", ["vit_classifier", "clip_vision", "dinov2_registers"])
@pytest.mark.parametrize("method", ["tcpa", "vpt"])
def test_disable_prompts_runs_the_original_hugging_face_model_bit_identically(name, method):
    pytest.importorskip("transformers", minversion="5.18")
    from tests.test_hf import features, has_head, plain_model
    from tests.test_hf import images as hf_images

    x = hf_images()
    model = plain_model(name)
    original = features(model(pixel_values=x))
    num_classes = 3 if has_head(model) else None
    if method == "tcpa":
        tk.apply_tcpa(model, backend="torch", num_classes=num_classes, **TCPA_KW)
    else:
        tk.apply_vpt(model, num_prompts=3, num_classes=num_classes)
    prompted = features(model(pixel_values=x))
    classes = [type(m) for m in model.modules()]
    with disable_prompts(model):
        assert torch.equal(features(model(pixel_values=x)), original)
    assert [type(m) for m in model.modules()] == classes
    assert torch.equal(features(model(pixel_values=x)), prompted)
    tk.remove_prompts(model)
    assert torch.equal(features(model(pixel_values=x)), original)


# ----------------------------------------------------------------------------------------------- configs passed whole


@pytest.mark.parametrize(("apply", "config", "keywords"), [
    (tk.apply_tcpa, TCPAConfig, dict(TCPA_KW, backend="torch", num_classes=3, renormalize=True)),
    (tk.apply_vpt, VPTConfig, dict(num_prompts=3, deep=False, num_classes=3)),
], ids=["tcpa", "vpt"])
def test_apply_takes_a_config_or_keywords(apply, config, keywords):
    given = config(**keywords)
    by_config, by_keywords = apply(small_vit(), given), apply(small_vit(), **keywords)  # same seed: same init
    assert state_of(by_config).config == state_of(by_keywords).config == given
    assert state_of(by_config).config is not given  # a copy: changing `given` later changes no model
    x = images()
    assert torch.equal(by_config(x), by_keywords(x))


@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda m: tk.apply_tcpa(m, TCPAConfig(), num_classes=3), TypeError,
     r"config: expected a TCPAConfig or keywords, not both, got config and num_classes"),
    (lambda m: tk.apply_tcpa(m, VPTConfig()), TypeError, "config: expected a TCPAConfig, got VPTConfig"),
    (lambda m: tk.apply_tcpa(m, pool_size=3), TypeError,
     r"pool_size: expected a TCPAConfig field \(pool_size_cls, .*\), got pool_size=3"),
    (lambda m: tk.apply_vpt(m, VPTConfig(num_prompts=2), deep=False), TypeError,
     r"config: expected a VPTConfig or keywords, not both, got config and deep"),
    (lambda m: tk.apply_vpt(m, deep=False), TypeError, r"num_prompts: expected the number of prompt tokens"),
    (lambda m: tk.apply_tcpa(m, TCPAConfig(**(TCPA_KW | dict(topk_img=9)))), ValueError,
     r"topk_img: expected an int in \[1, 5\], got 9"),
])
def test_bad_config_arguments_leave_the_model_unchanged(call, error, words):
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(error, match=words):
        call(model)
    assert_unchanged(model, before)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads: Python 3.11")
@pytest.mark.parametrize(("apply", "config"), [(tk.apply_tcpa, TCPAConfig), (tk.apply_vpt, VPTConfig)])
def test_typed_keywords_are_the_config_fields_with_their_defaults(apply, config):
    import inspect

    keywords = inspect.signature(typing.get_overloads(apply)[1]).parameters
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    assert set(keywords) - {"model"} == set(fields)
    defaults = {name: p.default for name, p in keywords.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {name: value for name, value in fields.items() if name != "num_prompts"}
