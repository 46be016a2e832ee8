"""``TCPAPrompts`` in a hand-written ViT (examples/handwritten_vit.py): equal to the official-style computation in
fp64 (logits, matching loss, every trainable gradient), the Triton kernels equal the torch path, the example runs,
and misuse gets a clear error."""

import copy
import importlib.util
import pathlib

import pytest
import torch

import tcpa_kernels as tk
from reference.prefix import prefix_prompts

_spec = importlib.util.spec_from_file_location(
    "handwritten_vit", pathlib.Path(__file__).parents[1] / "examples" / "handwritten_vit.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

POOLS = dict(pool_size_cls=3, pool_size_img=4, topk_cls=2, topk_img=3, prompt_len_cls=2, prompt_len_img=1)


def vit(dtype=torch.float64):
    torch.manual_seed(0)
    return example.ViT(img_size=16, patch_size=4, dim=32, depth=2, num_heads=2, num_classes=5).to(dtype).eval()


def images(dtype=torch.float64):
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("renormalize", [False, True])
def test_equals_official_style_fp64(renormalize):
    plain = vit()
    model = example.add_tcpa(copy.deepcopy(plain), backend="torch", renormalize=renormalize, **POOLS)
    plain.head = model.head
    x = images()
    logits = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 * 2 + 2
    grads = torch.autograd.grad(logits.square().sum() + tk.get_matching_loss(model), params)
    layer_params = [(b.tcpa.keys_cls, b.tcpa.keys_img, b.tcpa.prompts_cls, b.tcpa.prompts_img) for b in model.blocks]
    with prefix_prompts(plain.blocks, layer_params, topk_cls=2, topk_img=3, prompt_len_cls=2,
                        renormalize=renormalize) as losses:
        ref_logits = plain(x)
    ref_grads = torch.autograd.grad(ref_logits.square().sum() + sum(losses), params)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(tk.get_matching_loss(model), sum(losses), atol=1e-12, rtol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=1e-7)


def test_triton_kernels_equal_torch_path():
    results = []
    for backend in ("torch", "triton"):
        model = example.add_tcpa(vit(torch.float32), backend=backend, **POOLS)
        logits = model(images(torch.float32))
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((logits, torch.autograd.grad(logits.square().sum() + tk.get_matching_loss(model), params)))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_example_runs(capsys):
    example.main()
    assert "step 2: loss" in capsys.readouterr().out


def test_prompts_keep_nothing_of_a_forward():
    """A TCPAPrompts module's state is its parameters and config: a forward adds nothing to it, the model's matching
    loss is read through get_matching_loss, and copies hold the same parameters."""
    model = example.add_tcpa(vit(), backend="torch", **POOLS)
    prompts = model.blocks[0].tcpa
    before = dict(vars(prompts))
    model(images())
    assert vars(prompts).keys() == before.keys()
    assert tk.get_matching_loss(model) > 0 and tk.get_matching_loss(prompts) > 0
    for clone in (copy.deepcopy(prompts), torch.load(_saved(prompts), weights_only=False)):
        assert torch.equal(clone.prompts_img, prompts.prompts_img)


def test_matching_loss_of_the_layers_of_the_last_forward():
    """The layers that ran since the first of them last ran: a forward through the first block only (a truncated
    forward) gives that block's loss alone."""
    model = example.add_tcpa(vit(), backend="torch", **POOLS)
    x = images()
    model(x)
    full = tk.get_matching_loss(model)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1),
                        model.patch_embed(x).flatten(2).transpose(1, 2)], dim=1) + model.pos_embed
    model.blocks[0](tokens)
    first = tk.get_matching_loss(model)
    assert 0 < first < full
    torch.testing.assert_close(first, tk.get_matching_loss(model.blocks[0]))


def _saved(module):
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_clear_errors():
    prompts = tk.TCPAPrompts(32, backend="torch", **POOLS).double()
    q = k = v = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x: expected \[B, N >= 1, 32\] \(the block input\)"):
        prompts(q, k, v, x[..., :16], lambda p: (p, p))
    wrong = lambda p: (torch.zeros(1, 2, 6, 16, dtype=p.dtype),) * 2  # noqa: E731
    with pytest.raises(ValueError, match=r"project_kv\(prompts\)\[0\]: expected .* \[1, 2, 10, 16\]"):
        prompts(q, k, v, x, wrong)
    with pytest.raises(ValueError, match="topk_img: expected an int in"):
        tk.TCPAPrompts(32, **(POOLS | dict(topk_img=9)))
    with pytest.raises(ValueError, match="backend: expected one of"):
        tk.TCPAPrompts(32, backend="cuda")
    with pytest.raises(ValueError, match="dim: expected an int"):
        tk.TCPAPrompts(0)
