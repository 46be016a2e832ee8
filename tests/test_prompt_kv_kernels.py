"""The prompt K/V kernels (``tcpa_kernels/ops/_prompt_kv_kernels.py``): every layer's prompt keys/values and the
prompt parameters' gradients on the triton backend against an fp64 computation from the definition (each layer's
LayerNorm and the K/V rows of its linear), and the cases that stay on the torch ops."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import tcpa_kernels as tk
from tcpa_kernels import _prompt_kv
from tcpa_kernels._backend import kernels
from tcpa_kernels.ops import _prompt_kv_table
from tcpa_kernels.vit import state_of
from tests._helpers import TIMM_FAMILIES
from tests._philox import philox_multipliers, recorded_seeds

POOLS = dict(pool_size_cls=3, pool_size_img=5, topk_cls=2, topk_img=3, prompt_len_cls=2, prompt_len_img=1)
FAMILIES = {  # the K/V rows of one packed qkv per layer: with and without its bias, pre-norm and post-norm blocks
    "pre_norm": dict(),
    "no_qkv_bias": dict(qkv_bias=False),
    "post_norm": dict(block_fn=ResPostBlock),
}
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def random_affines(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with random norm weights and norm and linear biases (timm makes them ones and zeros: so that they
    matter)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)) and module.bias is not None:
            torch.nn.init.normal_(module.bias)
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight)
    return model


def prompted(family="pre_norm", dtype=torch.float32, **config):
    """A small timm ViT (``random_affines``) with TCPA on the triton backend, in ``dtype``."""
    torch.manual_seed(0)
    model = random_affines(VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                             num_classes=7, **FAMILIES[family]))
    config = dict(POOLS, backend="triton", prompt_dropout=0.0) | config
    return tk.apply_tcpa(model, **config).to(dtype).train()


def reference_kv(model, multipliers: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer [2, H, P, D] in fp64 from the definition: the layer's prompt tokens (CLS pool then image pool;
    times ``multipliers[l]`` [P, C], prompt dropout's, if given) through its pre-attention LayerNorm (none after a
    post-norm block) and the K and V rows of its qkv linear."""
    kv = []
    for i, blk in enumerate(model.blocks):
        tokens = torch.cat([blk.tcpa.prompts_cls.flatten(0, 1), blk.tcpa.prompts_img.flatten(0, 1)]).double()
        if multipliers is not None:
            tokens = tokens * multipliers[i]
        if not isinstance(blk, ResPostBlock):
            norm = blk.norm1
            tokens = F.layer_norm(tokens, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
        qkv, C = blk.attn.qkv, tokens.shape[-1]
        bias = None if qkv.bias is None else qkv.bias[C:].double()
        out = F.linear(tokens, qkv.weight[C:].double(), bias)  # [P, 2C]: keys, then values
        kv.append(out.unflatten(-1, (2, blk.attn.num_heads, -1)).movedim(0, -2))  # [2, H, P, D]
    return kv


def assert_fp32_kv_and_grads_match(kv: list[torch.Tensor], ref: list[torch.Tensor], params: list[torch.Tensor]):
    """fp32 K/V ``kv`` equal their fp64 definition ``ref``, and so do the gradients of sum(kv * g) (g random) of
    ``params``."""
    torch.manual_seed(1)
    weights = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
    grads = torch.autograd.grad(sum((k.double() * w).sum() for k, w in zip(kv, weights)), params)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    for a, b in zip([*kv, *grads], [*ref, *ref_grads]):
        torch.testing.assert_close(a.double(), b.double(), **TOLERANCE[torch.float32])


@pytest.fixture
def launches(monkeypatch):
    """The prompt K/V kernels' forward launches (a list, one entry each)."""
    module, calls = kernels("_prompt_kv_kernels"), []
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_kv_and_gradients_match_fp64(family, dtype, launches):
    """Training: one forward launch makes every layer's K/V, and the backward gives each prompt parameter its
    gradient of sum(kv * g); both equal the fp64 definition."""
    model = prompted(family, dtype)
    params = _prompt_kv.prompt_parameters(state_of(model))
    kv = _prompt_kv.all_layers_kv(state_of(model), 2)
    assert len(launches) == 1
    ref = reference_kv(model)
    torch.manual_seed(1)
    weights = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
    grads = torch.autograd.grad(sum((k.double() * w).sum() for k, w in zip(kv, weights)), params)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    for k, r in zip(kv, ref):
        assert k.dtype == dtype and k.shape == r.shape and k.is_contiguous()
        torch.testing.assert_close(k.double(), r, **TOLERANCE[dtype])
    for g, rg in zip(grads, ref_grads):
        scale = float(rg.abs().max())  # (the fp64 gradient, cast back to the parameter's dtype by autograd)
        torch.testing.assert_close(g.double() / scale, rg.double() / scale, **TOLERANCE[dtype])


def test_evaluation_matches_fp64(launches):
    """Without a gradient (evaluation) one launch and no graph."""
    model = prompted().eval()
    with torch.no_grad():
        kv = _prompt_kv.all_layers_kv(state_of(model), 2)
    assert len(launches) == 1
    for k, r in zip(kv, reference_kv(model)):
        assert k.grad_fn is None
        torch.testing.assert_close(k.double(), r, **TOLERANCE[torch.float32])


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """The kernels' tiles: LAUNCH's, or (``small``) 16 rows, columns and channels, so that several tiles of each
    cover the prompt rows and channels of ``prompted(pool_size_img=12)`` (P = 18, C = 32)."""
    module = kernels("_prompt_kv_kernels")
    if request.param == "small":
        small = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_C=16, num_warps=4, num_stages=1)
        monkeypatch.setattr(module, "LAUNCH", {"fwd": small, "bwd": small})
        module.forget_plans()
    yield request.param
    module.forget_plans()


@pytest.mark.parametrize("family", ["pre_norm", "post_norm"])
def test_prompt_dropout_inside_the_kernels_matches_fp64(family, tiles, launches, monkeypatch):
    """One dropout mask for the batch, drawn by the kernels themselves from a seed the node draws (element i of
    x [L, P, C] kept iff Philox(seed, i) >= p): the K/V and the prompt gradients equal the fp64 definition with
    those multipliers, the backward redrawing the forward's; the same seed gives the same K/V, the next forward
    another mask."""
    p = 0.3
    model = prompted(family, prompt_dropout=p, pool_size_img=12)
    params = _prompt_kv.prompt_parameters(state_of(model))
    seeds = recorded_seeds(monkeypatch)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        kv = _prompt_kv.all_layers_kv(state_of(model), 2)
        again = _prompt_kv.all_layers_kv(state_of(model), 2)
        torch.manual_seed(5)
        same = _prompt_kv.all_layers_kv(state_of(model), 2)
    assert len(launches) == 3 and len(seeds) == 3 and not torch.equal(again[0], kv[0])
    assert all(torch.equal(a, b) for a, b in zip(same, kv))
    multipliers = philox_multipliers(seeds[0], (len(kv), *kv[0].shape[-2:-1], model.embed_dim), p)  # [L, P, C]
    assert 0.6 < multipliers.ne(0).double().mean() < 0.8
    ref = reference_kv(model, multipliers)
    assert_fp32_kv_and_grads_match(kv, ref, params)


@pytest.mark.parametrize("case", ["trainable_qkv", "trainable_norm", "bf16_off_cuda"])
def test_what_the_kernels_do_not_take_runs_on_the_torch_ops(case, launches):
    """A trainable norm or qkv weight (the kernels compute no gradient for them) and bf16 off CUDA (the
    interpreter's bf16 dots are wrong) run the torch ops; the trainable weight gets its gradient."""
    model = prompted(dtype=torch.bfloat16 if case == "bf16_off_cuda" else torch.float32)
    trainable = {"trainable_qkv": model.blocks[1].attn.qkv.weight, "trainable_norm": model.blocks[1].norm1.weight,
                 "bf16_off_cuda": None}[case]
    if trainable is not None:
        trainable.requires_grad_(True)
    kv = _prompt_kv.all_layers_kv(state_of(model), 2)
    assert launches == []
    for k, r in zip(kv, reference_kv(model)):
        torch.testing.assert_close(k.double(), r, atol=0.05 if case == "bf16_off_cuda" else 2e-5, rtol=0.02)
    if trainable is not None:
        (grad,) = torch.autograd.grad(kv[1].sum(), [trainable])
        assert grad.abs().sum() > 0


def test_weights_are_read_at_each_launch(launches, monkeypatch):
    """The kernels read the weights through a table of their addresses, made once per set of addresses (made under
    inference_mode too, a plain tensor: it outlives the forward): a frozen weight changed in place, and a weight
    replaced by another tensor, are what the next forward reads."""
    monkeypatch.setattr(_prompt_kv_table, "_tables", {})  # no table made by an earlier test
    model = prompted()
    state = state_of(model)
    with torch.inference_mode():
        _prompt_kv.all_layers_kv(state, 2)
    assert not any(t.is_inference() for t in _prompt_kv_table._tables.values() if t is not None)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.5)
    changed = _prompt_kv.all_layers_kv(state, 2)
    torch.testing.assert_close(changed[0].double(), reference_kv(model)[0], **TOLERANCE[torch.float32])
    qkv = model.blocks[2].attn.qkv
    qkv.weight = torch.nn.Parameter(torch.randn_like(qkv.weight), requires_grad=False)
    replaced = _prompt_kv.all_layers_kv(state, 2)
    torch.testing.assert_close(replaced[2].double(), reference_kv(model)[2], **TOLERANCE[torch.float32])
    assert len(launches) == 3


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=7))


@pytest.mark.parametrize("family", ["eva02", "eva_fused_qkv_registers", "eva_post_norm", "hf_vit"])
def test_separate_key_value_weights_and_biases_match_fp64(family, launches):
    """Families whose key and value rows come from two weights (EVA-02's k/v projections, Hugging Face's key and
    value linears) or whose biases are separate tensors (a fused-qkv Eva's q/v biases and zero k bias): the kernels
    against each layer's own norm and K/V projection evaluated in fp64."""
    torch.manual_seed(0)
    model = hf_vit() if family == "hf_vit" else TIMM_FAMILIES[family]()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bias", "norm.weight", "norm1.weight", "layernorm_before.weight")):
                t.normal_()
    model = tk.apply_tcpa(model, **POOLS, backend="triton", prompt_dropout=0.0).train()
    state = state_of(model)
    params = _prompt_kv.prompt_parameters(state)
    kv = _prompt_kv.all_layers_kv(state, 2)
    assert len(launches) == 1
    reference = copy.deepcopy(model).double()
    ref_state = state_of(reference)
    ref_params = _prompt_kv.prompt_parameters(ref_state)
    tokens = torch.cat([t.flatten(0, 1) for t in ref_params]).view(len(kv), -1, ref_params[0].shape[-1])  # [L, P, C]
    ref = [_prompt_kv.layer_kv(p, t) for p, t in zip(ref_state.projections, tokens.unbind(0))]
    weights = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
    grads = torch.autograd.grad(sum((k.double() * w).sum() for k, w in zip(kv, weights)), params)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), ref_params)
    for k, r in zip(kv, ref):
        torch.testing.assert_close(k.double(), r, **TOLERANCE[torch.float32])
    for g, rg in zip(grads, ref_grads):
        scale = float(rg.abs().max())
        torch.testing.assert_close(g.double() / scale, rg / scale, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("family", ["pre_norm", "post_norm"])
def test_prompt_dropout_per_sample_inside_the_kernels_matches_fp64(family, tiles, launches, monkeypatch):
    """A dropout mask per sample (the published code's): the kernels read the [L, P, C] prompt rows once per sample,
    each sample's its own mask (element i of the [L, B * P, C] rows the samples make: Philox(seed, i) >= p), and
    write each sample's K/V [B, 2, H, P, D]; the backward sums the samples' gradients in the kernel. Both equal the
    fp64 definition, sample by sample. Two backward programs per block of rows (``SET_GROUPS``): one adds samples 0
    and 2, the other has sample 1, and the launcher adds the two partials."""
    module = kernels("_prompt_kv_kernels")
    monkeypatch.setattr(module, "SET_GROUPS", 2)
    module.forget_plans()  # (the tiles fixture forgets these plans after the test)
    p, B = 0.3, 3
    model = prompted(family, prompt_dropout=p, prompt_dropout_per_sample=True, pool_size_img=12)
    params = _prompt_kv.prompt_parameters(state_of(model))
    seeds = recorded_seeds(monkeypatch)
    kv = _prompt_kv.all_layers_kv(state_of(model), B)
    assert len(launches) == 1 and len(seeds) == 1 and kv[0].shape[0] == B
    multipliers = philox_multipliers(seeds[0], (len(kv), B, kv[0].shape[-2], model.embed_dim), p)  # [L, B, P, C]
    assert not torch.equal(multipliers[:, 0], multipliers[:, 1])
    ref = [torch.stack(layer) for layer in zip(*(reference_kv(model, multipliers[:, b]) for b in range(B)))]
    assert_fp32_kv_and_grads_match(kv, ref, params)


def test_compiled_step_runs_the_kernels_and_draws_the_eager_masks(launches):
    """Under torch.compile (fullgraph; aot_eager, which keeps eager's random stream) the prompt K/V pass is the
    kernel ops: a train step with prompt dropout launches the kernels and gives eager's loss and every gradient from
    the same seed."""
    torch._dynamo.reset()
    model = prompted(prompt_dropout=0.3)
    params = tk.trainable_parameters(model)
    x = torch.randn(2, 3, 16, 16)

    def step(images):
        return model(images).square().mean() + tk.get_matching_loss(model)

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(3)
        loss = run(x)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert len(launches) == 2  # a forward launch in each step, the compiled one through the kernel op
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss)
    for g, compiled_g in zip(grads, compiled_grads):
        torch.testing.assert_close(compiled_g, g)
