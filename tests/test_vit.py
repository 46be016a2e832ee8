"""apply_tcpa / apply_vpt on small timm ViTs built without weights."""

import copy

import pytest
import torch
from timm.models.vision_transformer import DiffParallelScalingBlock, ResPostBlock, VisionTransformer

import tcpa_kernels as tk
from reference.vit import tcpa_vit_forward_ref, vpt_vit_forward_ref
from tcpa_kernels.dense_baseline import apply_dense_tcpa

TCPA_KW = dict(pool_size_cls=3, pool_size_img=5, topk_cls=2, topk_img=3, prompt_len_cls=2, prompt_len_img=1)
REF_KW = dict(topk_cls=2, topk_img=3, prompt_len_cls=2, prompt_len_img=1)


def small_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    return VisionTransformer(**(args | kw)).eval()


def images(B=2, seed=1, size=16):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def layer_params(model):
    names = ("keys_cls", "keys_img", "prompts_cls", "prompts_img")
    return [tuple(getattr(blk.tcpa, n) for n in names) for blk in model.blocks]


VARIANTS = {
    "cls": {},
    "registers_qknorm_layerscale": dict(reg_tokens=2, qk_norm=True, init_values=0.1),
    "no_class_token": dict(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tcpa_model_matches_reference_fp64(variant):
    model = tk.apply_tcpa(small_vit(**VARIANTS[variant]).double(), backend="torch", num_classes=4, **TCPA_KW)
    x = images().double()
    logits = model(x)
    loss = logits.square().sum() + tk.get_matching_loss(model)
    params = tk.trainable_parameters(model)
    grads = torch.autograd.grad(loss, params)

    ref_logits, ref_match = tcpa_vit_forward_ref(model, x, layer_params(model), **REF_KW)
    ref_grads = torch.autograd.grad(ref_logits.square().sum() + ref_match, params, allow_unused=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(tk.get_matching_loss(model), ref_match, atol=1e-10, rtol=1e-9)
    for p, g, rg in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(p) if rg is None else rg, atol=1e-9, rtol=1e-7)


def test_triton_backend_equals_torch_backend():
    x = images()
    results = []
    for backend in ("torch", "triton"):
        model = tk.apply_tcpa(small_vit(), backend=backend, **TCPA_KW)  # same seed: same prompts and keys
        logits = model(x)
        loss = logits.square().sum() + tk.get_matching_loss(model)
        results.append((logits, torch.autograd.grad(loss, tk.trainable_parameters(model))))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-4)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_frozen_backbone_state_dict_and_remove():
    model = small_vit()
    x = images()
    original_logits = model(x)
    original_keys = set(model.state_dict())
    tk.apply_tcpa(model, backend="torch", **TCPA_KW)
    assert original_keys <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{n}" for i in range(2) for n in
                         ("tcpa.keys_cls", "tcpa.keys_img", "tcpa.prompts_cls", "tcpa.prompts_img")} | {
                         "head.weight", "head.bias"}
    (model(x).sum() + tk.get_matching_loss(model)).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert model.blocks[0].tcpa.keys_cls.shape == (3, 32) and model.blocks[1].tcpa.prompts_cls.shape == (3, 2, 32)
    assert model.blocks[0].tcpa.keys_cls.abs().max() <= 1.0  # uniform(-1, 1)
    tk.remove_prompts(model)
    assert set(model.state_dict()) == original_keys
    assert torch.equal(model(x), original_logits)
    assert all(p.requires_grad for p in model.parameters())


def test_train_mode_keeps_backbone_eval_and_prompt_dropout_follows():
    model = tk.apply_tcpa(small_vit(drop_path_rate=0.5), backend="torch", prompt_dropout=0.5, **TCPA_KW)
    model.train()
    prompts = {id(blk.tcpa) for blk in model.blocks}
    assert model.training and all(blk.tcpa.training for blk in model.blocks)
    assert not any(m.training for m in model.modules() if m is not model and id(m) not in prompts)
    x = images()
    assert not torch.equal(model(x), model(x))  # prompt dropout active
    model.eval()
    assert torch.equal(model(x), model(x))


def test_random_selection():
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
    x = images()
    topk_logits = model(x)
    tk.set_selection(model, "random")
    torch.manual_seed(0)
    a = model(x)
    assert tk.get_matching_loss(model).item() == 0.0
    torch.manual_seed(0)
    assert torch.equal(model(x), a) and not torch.equal(a, topk_logits)
    with pytest.raises(ValueError, match="mode: expected one of"):
        tk.set_selection(model, "greedy")


def test_save_load_round_trip(tmp_path):
    model = tk.apply_tcpa(small_vit(), backend="torch", num_classes=3, **TCPA_KW)
    with torch.no_grad():
        for p in tk.trainable_parameters(model):
            p.add_(0.1)
    path = tmp_path / "prompts.safetensors"
    tk.save_prompts(model, path)
    fresh = tk.load_prompts(small_vit(), path)  # a plain timm model with the same backbone weights
    x = images()
    assert torch.equal(fresh(x), model(x))
    other = tk.apply_tcpa(small_vit(), backend="torch", **(TCPA_KW | dict(pool_size_img=6)))
    with pytest.raises(ValueError, match="path: checkpoint holds tcpa"):
        tk.load_prompts(other, path)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_checkpointing_same_gradients(backend):
    """Prompt dropout on (its default, 0.1): the checkpointed recomputation replays the forward's masks (triton: the
    prompt K/V kernels' seed, redrawn from the restored random state)."""
    x = images()
    grads = []
    for checkpointing in (False, True):
        model = tk.apply_tcpa(small_vit(), backend=backend, **TCPA_KW)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(3)  # prompt dropout: the recomputation must replay the same mask
        loss = model(x).square().sum() + tk.get_matching_loss(model)
        grads.append(torch.autograd.grad(loss, tk.trainable_parameters(model)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_fullgraph(autocast):
    """fullgraph=True: the prompted attention (custom ops) compiles without a graph break, under bf16 autocast too
    (the block node reads the autocast state)."""
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        eager = model(x)
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager)
    (out.float().sum() + tk.get_matching_loss(model)).backward()
    assert model.blocks[0].tcpa.prompts_img.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_evaluation_under_no_grad(backend):
    """A compiled model evaluated under no_grad (a validation loop) is one graph too, equal to eager: there the prompt
    K/V pass runs as plain ops (dynamo, inlining an autograd function's forward without grad, passed the norm's eps
    to it as a tensor)."""
    model = tk.apply_tcpa(small_vit(), backend=backend, **TCPA_KW).eval()
    x = images()
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, eager)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_before_any_eager_forward(backend):
    """A model compiled right after it is patched, before any eager forward, is one graph (what the prompt K/V pass
    reads of the blocks' structure is made with the model, not cached at the first forward: Python 3.11's
    cached_property takes a lock dynamo cannot trace), and its train step equals eager's."""
    torch._dynamo.reset()
    model = tk.apply_tcpa(small_vit(), backend=backend, **TCPA_KW)
    x = images()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    loss = out.sum() + tk.get_matching_loss(model)
    grads = torch.autograd.grad(loss, tk.trainable_parameters(model))
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum() + tk.get_matching_loss(model), tk.trainable_parameters(model))
    torch.testing.assert_close(out, eager)
    for g, eager_g in zip(grads, eager_grads):
        torch.testing.assert_close(g, eager_g)


def test_topk_bits_op_opcheck():
    """The selection op the random-selection epochs use (the attention and matching ops are opchecked in
    test_packed.py and test_match_select.py)."""
    from tcpa_kernels.ops._function import topk_bits_op

    torch.library.opcheck(topk_bits_op.overload, (torch.rand(2, 5, 6), None, 1, 2, 1, 2, "torch"))


def test_autocast_bf16_runs():
    model = tk.apply_tcpa(small_vit(qk_norm=True), backend="torch", **TCPA_KW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
        loss = out.float().square().mean() + tk.get_matching_loss(model)
    loss.backward()
    assert torch.isfinite(model.blocks[1].tcpa.prompts_img.grad).all()


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_matches_reference(deep):
    model = tk.apply_vpt(small_vit(reg_tokens=1).double(), num_prompts=3, deep=deep, num_classes=5)
    x = images().double()
    logits = model(x)
    prompts = [getattr(blk, "vpt_prompts", None) for blk in model.blocks]
    assert (prompts[1] is not None) == deep
    ref = vpt_vit_forward_ref(model, x, prompts)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-9)
    grads = torch.autograd.grad(logits.sum(), tk.trainable_parameters(model))
    ref_grads = torch.autograd.grad(ref.sum(), tk.trainable_parameters(model))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_deit_distilled():
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=2)
    assert model.num_prefix_tokens == 2
    tk.apply_tcpa(model.eval(), backend="torch", num_classes=3, **TCPA_KW)
    out = model(images(size=32))
    assert out.shape == (2, 3)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head_dist.weight"} <= params


def test_clear_errors():
    with pytest.raises(TypeError, match=r"model: expected a timm VisionTransformer .* got torch.nn.modules.linear"):
        tk.apply_tcpa(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"model.blocks\[0\]: no TCPA/VPT integration for DiffParallelScalingBlock"):
        tk.apply_tcpa(small_vit(block_fn=DiffParallelScalingBlock))
    with pytest.raises(TypeError, match=r"model: the published dense-mask baseline is implemented for timm ViTs of "
                                        r"pre-norm Blocks only, got VisionTransformer"):
        apply_dense_tcpa(small_vit(block_fn=ResPostBlock))
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
    with pytest.raises(ValueError, match="model: already has tcpa prompts"):
        tk.apply_vpt(model, num_prompts=2)
    with pytest.raises(ValueError, match="attn_mask/is_causal"):
        model(images(), is_causal=True)
    with pytest.raises(ValueError, match="topk_img: expected an int in \\[1, 5\\], got 9"):
        tk.apply_tcpa(small_vit(), **(TCPA_KW | dict(topk_img=9)))
    with pytest.raises(ValueError, match="model: expected a model patched"):
        tk.get_matching_loss(small_vit())
    copy.deepcopy(model)  # a patched model can be copied (e.g. for EMA)


@pytest.mark.parametrize("renormalize", [False, True])
def test_dense_official_style_baseline_equals_fused(renormalize):
    x = images()
    results = []
    for apply in (tk.apply_tcpa, apply_dense_tcpa):
        model = apply(small_vit(reg_tokens=1), backend="torch", renormalize=renormalize, **TCPA_KW)
        logits = model(x)
        loss = logits.square().sum() + tk.get_matching_loss(model)
        results.append((logits, torch.autograd.grad(loss, tk.trainable_parameters(model))))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_eval_follows_every_parameter_change():
    """No forward result is kept: an in-place update through ``.data`` (which no version counter sees), an optimizer
    step or load_state_dict shows in the very next eval forward, under no_grad or not."""
    model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW).eval()
    x = images()
    with torch.no_grad():
        first = model(x)
        model.blocks[1].tcpa.prompts_img.data.add_(torch.randn(5, 1, 32))
        changed = model(x)
        model.load_state_dict(copy.deepcopy(model.state_dict()) | {"blocks.0.norm1.weight": torch.zeros(32)})
        zeroed = model(x)
    assert not torch.allclose(changed, first) and not torch.allclose(zeroed, changed)
    torch.testing.assert_close(zeroed, model(x))


@pytest.mark.parametrize("case", ["unequal_norm_eps", "trainable_norm1", "trainable_qkv", "trainable_qkv_bias",
                                  "frozen_weight_changed"])
def test_prompt_kv_paths_match_reference_fp64(case):
    """The batched prompt K/V (one layer norm, the layers' affines on the prompts, one batched GEMM) and its
    per-layer fallback are exact, with a trainable norm1 or qkv and after a frozen weight changed in place."""
    model = tk.apply_tcpa(small_vit().double(), backend="torch", **TCPA_KW)
    x = images().double()
    if case == "unequal_norm_eps":  # layers no longer batch: one norm1 + linear per layer
        model.blocks[1].norm1.eps = 1e-3
    elif case == "trainable_norm1":  # the affine on the prompts: norm1 gets its gradient
        model.blocks[1].norm1.weight.requires_grad_(True)
    elif case == "trainable_qkv":  # the batched GEMM's weight and bias gradients
        model.blocks[0].attn.qkv.weight.requires_grad_(True)
        model.blocks[1].attn.qkv.bias.requires_grad_(True)
    elif case == "trainable_qkv_bias":  # frozen weights (one node for norm and GEMM), a trainable bias
        model.blocks[1].attn.qkv.bias.requires_grad_(True)
    else:  # the prompt K/V follow an in-place change of a frozen weight
        model(x)
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(1.5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).square().sum() + tk.get_matching_loss(model), params)
    ref_logits, ref_match = tcpa_vit_forward_ref(model, x, layer_params(model), **REF_KW)
    ref_grads = torch.autograd.grad(ref_logits.square().sum() + ref_match, params, allow_unused=True)
    for p, g, rg in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(p) if rg is None else rg, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("selection", ["topk", "random"])
def test_second_order_gradients_raise(selection):
    """A gradient penalty (create_graph=True) through the ops would miss second-order terms: refused, clearly."""
    model = tk.set_selection(tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW), selection)
    loss = model(images()).square().sum() + tk.get_matching_loss(model)
    with pytest.raises(RuntimeError, match="second-order gradients \\(backward with create_graph=True\\) are not"):
        torch.autograd.grad(loss, tk.trainable_parameters(model), create_graph=True)
    # first order still works, also without the matching loss (the keys then get no gradient)
    params = tk.trainable_parameters(model)
    grads = dict(zip(map(id, params), torch.autograd.grad(model(images()).square().sum(), params, allow_unused=True)))
    assert grads[id(model.blocks[1].tcpa.prompts_img)].abs().sum() > 0
    assert grads[id(model.blocks[1].tcpa.keys_img)] is None


def test_torch_compile_with_grad_checkpointing():
    """Gradient checkpointing under torch.compile(fullgraph=True): a block records its matching-loss terms on the
    forward's object, a side effect dynamo's checkpoint must not replay in the backward, which its flag
    ``skip_fwd_side_effects_in_bwd_under_checkpoint`` says (docs/api.md). With it, loss and gradients equal eager's."""
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        pytest.skip(f"torch {torch.__version__} has no skip_fwd_side_effects_in_bwd_under_checkpoint")
    x = images()
    results = []
    for compiled in (False, True):
        model = tk.apply_tcpa(small_vit(), backend="torch", prompt_dropout=0.0, **TCPA_KW)
        model.set_grad_checkpointing(True)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            loss = run(x).square().sum() + tk.get_matching_loss(run)
        results.append((loss, torch.autograd.grad(loss, tk.trainable_parameters(model))))
    torch._dynamo.reset()
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_batch_runs_forward_and_backward(backend, per_sample):
    """A batch of 0 images (the last batch of a split, a filter that keeps nothing): empty logits, a zero matching
    loss and zero prompt gradients, as the no-prompt model gives empty logits; in training, with one prompt-dropout
    mask for the batch or one per sample (none: no samples)."""
    model = tk.apply_tcpa(small_vit(), backend=backend, prompt_dropout_per_sample=per_sample, **TCPA_KW).train()
    out = model(torch.randn(0, 3, 16, 16))
    loss = out.sum() + tk.get_matching_loss(model)
    loss.backward()
    assert out.shape == (0, model.num_classes) and float(loss) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in tk.trainable_parameters(model))


def _autograd_nodes(t):
    """Names of the autograd nodes t's graph runs."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


BLOCK_CASES = {  # how a timm Block's attention runs: (model kwargs, the change, the attention nodes it makes)
    "one_node_with_proj": ({}, None, {"BlockAttentionBackward"}),
    "one_node_layer_scale": (dict(init_values=0.1), None, {"BlockAttentionBackward", "AddmmBackward0"}),
    "one_node_trainable_proj": ({}, "proj", {"BlockAttentionBackward", "AddmmBackward0"}),
    "per_op_trainable_qkv": ({}, "qkv", {"MatchSelectBackward", "PackedAttentionBackward"}),
    "per_op_qk_norm": (dict(qk_norm=True), None, {"MatchSelectBackward", "PackedAttentionBackward"}),
}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_attention_paths_match_reference_fp64(case):
    """A timm Block's attention as one autograd node (norm1, matching, qkv, attention and, when nothing sits between,
    proj and the residual), or its per-op path when a layer trains or sits between: logits, matching loss and every
    trainable gradient equal the fp64 reference, and the graph holds the nodes of the path the block should take."""
    kwargs, trainable, nodes = BLOCK_CASES[case]
    model = tk.apply_tcpa(small_vit(**kwargs).double(), backend="torch", **TCPA_KW)
    if trainable is not None:
        getattr(model.blocks[1].attn, trainable).weight.requires_grad_(True)
    x = images().double()
    logits = model(x)
    assert nodes <= _autograd_nodes(logits)
    assert ("PackedAttentionBackward" in nodes) == ("PackedAttentionBackward" in _autograd_nodes(logits))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.square().sum() + tk.get_matching_loss(model), params)
    ref_logits, ref_match = tcpa_vit_forward_ref(model, x, layer_params(model), **REF_KW)
    ref_grads = torch.autograd.grad(ref_logits.square().sum() + ref_match, params, allow_unused=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-9)
    for p, g, rg in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(p) if rg is None else rg, atol=1e-9, rtol=1e-7)


def test_block_attention_node_equals_per_op_path_under_autocast(monkeypatch):
    """Under bf16 autocast the one node casts and multiplies as autocast runs the per-op path's linears: the same
    logits, matching loss and trainable gradients."""
    from tcpa_kernels.integrations import timm_vit

    plan = timm_vit._block_plan
    results = []
    for one_node in (True, False):
        monkeypatch.setattr(timm_vit, "_block_plan", plan if one_node else lambda blk: (False, None))
        model = tk.apply_tcpa(small_vit(), backend="torch", **TCPA_KW)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images())
            loss = logits.float().square().mean() + tk.get_matching_loss(model)
        assert ("BlockAttentionBackward" in _autograd_nodes(loss)) == one_node
        results.append((logits, tk.get_matching_loss(model), torch.autograd.grad(loss, tk.trainable_parameters(model))))
    (logits, match, grads), (ref_logits, ref_match, ref_grads) = results
    assert logits.dtype == ref_logits.dtype
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    torch.testing.assert_close(match, ref_match, atol=0, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=0, rtol=0)
