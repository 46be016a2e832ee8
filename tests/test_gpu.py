"""GPU-only checks: bf16, large shapes, atomic vs deterministic reductions, bitwise determinism."""

import pytest
import torch

import tcpa_kernels as tk
from reference import tcpa_attention_ref
from tests.conftest import assert_matches_reference, attention_inputs, fp64, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
def test_bf16_matches_reference(renormalize, shared, D, poison_buffers):
    tensors, mask = attention_inputs(2, 3, 197, 36, D, dtype=torch.bfloat16, shared=shared)
    ref_tensors = fp64(tensors)
    ref = tcpa_attention_ref(*ref_tensors, mask, renormalize=renormalize)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_tensors, grad_out)
    out = tk.tcpa_attention(*tensors, mask, renormalize=renormalize, backend="triton")
    assert_matches_reference(out, torch.autograd.grad(out, tensors, grad_out.bfloat16()), ref, ref_grads,
                             torch.bfloat16)


def test_vit_b_shapes_fp16():
    tensors, mask = attention_inputs(16, 12, 197, 36, 64, dtype=torch.float16)
    ref_tensors = fp64(tensors)
    ref = tcpa_attention_ref(*ref_tensors, mask)
    grad_out = torch.randn_like(ref)
    out = tk.tcpa_attention(*tensors, mask, backend="triton")
    assert_matches_reference(out, torch.autograd.grad(out, tensors, grad_out.half()), ref,
                             torch.autograd.grad(ref, ref_tensors, grad_out), torch.float16)


def test_large_batch_head_grid():
    """B*H = 70,000 programs on grid axis 0 (beyond the 65,535 limit of axes 1 and 2)."""
    tensors, mask = attention_inputs(7000, 10, 5, 2, 32, dtype=torch.float16)
    out = tk.tcpa_attention(*tensors, mask, backend="triton")
    ref = tk.tcpa_attention(*tensors, mask, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-2)


def test_atomic_vs_deterministic_and_bitwise_repeatability():
    tensors, mask = attention_inputs(32, 12, 197, 36, 64, dtype=torch.bfloat16)
    grad_out = torch.randn(32, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    runs = {}
    for deterministic in (True, True, False):
        out = tk.tcpa_attention(*tensors, mask, backend="triton", deterministic=deterministic)
        runs.setdefault(deterministic, []).append(torch.autograd.grad(out, tensors, grad_out))
    for a, b in zip(*runs[True]):
        assert torch.equal(a, b)  # deterministic mode: bitwise identical
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_batch_split_backward_is_the_one_program_backward_bitwise(dtype, monkeypatch):
    """ViT-B/16 at batch 8: 96 (batch, head)s split their key tiles over 3 programs each on an H100; the dq sum in
    tile order gives the bits of one program per (batch, head), run after run (the tickets order nothing else)."""
    from tcpa_kernels.ops import _attention_kernels

    tensors, mask = attention_inputs(8, 12, 197, 36, 64, dtype=dtype)
    grad_out = torch.randn(8, 12, 197, 64, device="cuda", dtype=dtype)
    device_sms = _attention_kernels.sm_count
    runs = []
    for sms in (lambda device: None, device_sms, device_sms):  # one program per (batch, head); split, twice
        monkeypatch.setattr(_attention_kernels, "sm_count", sms)
        _attention_kernels.forget_plans()
        out = tk.tcpa_attention(*tensors, mask, backend="triton")
        runs.append(torch.autograd.grad(out, tensors, grad_out))
    _attention_kernels.forget_plans()
    assert _attention_kernels.key_splits(8 * 12, 4, device_sms(torch.device("cuda"))) > 1
    for one, split, again in zip(*runs):
        assert torch.equal(one, split) and torch.equal(split, again)


@pytest.mark.parametrize("options", [{}, dict(prompt_transform="fourier", prompt_dropout_per_sample=True)],
                         ids=["tcpa", "vfpt_tcpa_per_sample"])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_model_path_triton_equals_torch(autocast, options):
    """The whole TCPA layer on CUDA (matching kernels, packed attention, batched prompt K/V; per-sample prompt K/V
    and Fourier prompts as published) against the torch backend on the same parameters: logits, matching loss and
    every trainable gradient (fp32, or bf16 autocast)."""
    from timm.models.vision_transformer import VisionTransformer

    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)  # same backbone, prompts and keys for both backends
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)
        model = tk.apply_tcpa(model.cuda(), backend=backend, pool_size_cls=4, pool_size_img=6, topk_cls=2,
                              topk_img=3, **options).train()
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(2)  # the same prompt dropout mask
            logits = model(x).float()
            loss = logits.square().mean() + tk.get_matching_loss(model)
        results.append((logits, tk.get_matching_loss(model), torch.autograd.grad(loss, tk.trainable_parameters(model))))
    atol, rtol = (2e-2, 5e-2) if autocast else (1e-4, 1e-3)  # 2 layers of fp32 / bf16 arithmetic
    (logits, match, grads), (ref_logits, ref_match, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    torch.testing.assert_close(match, ref_match, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg.float(), atol=atol * float(rg.abs().max()), rtol=rtol)


@pytest.mark.parametrize("width", [64, 36], ids=["aligned", "bf16_k_v_off_16_bytes"])
@pytest.mark.parametrize("autocast", [False, True])
def test_direct_launches_equal_tritons_dispatch_bitwise(width, autocast, monkeypatch):
    """The project's direct launches (``ops/_launch.py``) run the very kernels Triton's dispatch picks: a TCPA train
    step gives bitwise the logits, matching loss and trainable gradients it gives with every launch through
    ``kernel[grid]``; at width 36 the bf16 k and v slices of qkv sit 8 bytes off a 16-byte boundary."""
    from timm.models.vision_transformer import VisionTransformer

    from tcpa_kernels.ops import _launch

    results = []
    for direct in (True, False, True):
        monkeypatch.setattr(_launch, "DIRECT", direct)
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=2, num_heads=2, num_classes=5)
        model = tk.apply_tcpa(model.cuda(), backend="triton", pool_size_cls=4, pool_size_img=6, topk_cls=2,
                              topk_img=3).train()
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(2)  # the same prompt dropout mask
            logits = model(x).float()
            loss = logits.square().mean() + tk.get_matching_loss(model)
        results.append((logits, loss, *torch.autograd.grad(loss, tk.trainable_parameters(model))))
    for run in results[1:]:  # dispatch, then direct again (from the cache)
        for a, b in zip(results[0], run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["vit_res_post_block", "vit_parallel_scaling_block", "eva02",
                                    "eva_rope_gqa_dinov3"])
def test_other_block_families_triton_equal_torch(family):
    """A block family's own forward around the attention op (TCPAPrompts: match_select, tcpa_attention on a
    Selection) on CUDA against the torch backend: logits, matching loss and every trainable gradient (fp32)."""
    from tests._helpers import TIMM_FAMILIES, assert_backends_agree

    def make_model(backend):
        torch.manual_seed(0)  # the same backbone, prompts and keys for both backends
        return tk.apply_tcpa(TIMM_FAMILIES[family]().cuda(), backend=backend, pool_size_cls=3, pool_size_img=4,
                             topk_cls=2, topk_img=3)

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    assert_backends_agree(make_model, x, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("train", [True, False], ids=["train_step", "eval"])
def test_cuda_graphs_reduce_overhead_equals_eager(train):
    """``torch.compile(model, mode="reduce-overhead")`` captures the TCPA forward (and backward) into CUDA graphs:
    no host sync or CPU tensor in the step. Over several steps (graph replays, an SGD step between them so the
    prompts change) the captured logits, matching loss and prompt gradients equal eager's."""
    from timm.models.vision_transformer import VisionTransformer

    def build():
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)
        return tk.apply_tcpa(model.cuda(), pool_size_cls=4, pool_size_img=6, topk_cls=2, topk_img=3,
                             prompt_dropout=0.0).train(train)

    eager, captured = build(), build()
    compiled = torch.compile(captured, mode="reduce-overhead")
    optimizers = [torch.optim.SGD(tk.trainable_parameters(m), lr=0.1) for m in (eager, captured)]
    for step in range(4):
        x = torch.randn(3, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        results = []
        for model, run in ((eager, eager), (captured, compiled)):
            with torch.set_grad_enabled(train):
                logits = run(x)
                loss = logits.square().mean() + tk.get_matching_loss(run)
            grads = torch.autograd.grad(loss, tk.trainable_parameters(model)) if train else ()
            results.append((logits.clone(), tk.get_matching_loss(run).clone(), [g.clone() for g in grads]))
        (logits, match, grads), (ref_logits, ref_match, ref_grads) = results[1], results[0]
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(match, ref_match, atol=1e-4, rtol=1e-3)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-4 * float(rg.abs().max()), rtol=1e-3)
        if train:
            for optimizer, model, model_grads in zip(optimizers, (eager, captured), (ref_grads, grads)):
                for p, g in zip(tk.trainable_parameters(model), model_grads):
                    p.grad = g
                optimizer.step()


@pytest.mark.parametrize("layouts", ["shared", "different"])
def test_prompt_bank_cuda_graphs_equal_eager(tmp_path, layouts):
    """A prompt bank served with task numbers in a tensor under ``torch.compile(mode="reduce-overhead",
    fullgraph=True)``: one graph, captured once and replayed for batches of other tasks, logits equal eager's (tasks
    of one pool layout, and of different ones: each sample's gathered on the device)."""
    from tests.test_bank import LAYOUTS, POOLS, save_tasks, tiny_vit

    folders = save_tasks(tmp_path, POOLS, options=LAYOUTS[layouts])
    bank = tk.PromptBank(tiny_vit(), folders, backend="triton").cuda().eval()
    compiled = torch.compile(bank, mode="reduce-overhead", fullgraph=True)
    g = torch.Generator("cuda").manual_seed(0)
    for _ in range(4):
        x = torch.randn(6, 3, 16, 16, device="cuda", generator=g)
        tasks = torch.randint(0, len(bank.task_names), (6,), device="cuda", generator=g)
        with torch.no_grad():
            expected = bank(x, tasks).logits
            out = compiled(x, tasks).logits.clone()  # a replay's output lives in the graph's memory pool
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_prompt_bank_of_different_pools_triton_equals_torch(tmp_path, autocast):
    """A bank of tasks with different pool sizes, top-k and prompt lengths, prompt dropout per sample, on CUDA
    (per-sample layouts in the matching and attention kernels, bf16 autocast too) against the torch backend on the
    same parameters and masks: logits and every trainable gradient of ``bank.loss``."""
    from tests.test_bank import LAYOUTS, ORDERS, POOLS, save_tasks, tiny_vit

    folders = save_tasks(tmp_path, POOLS | dict(prompt_dropout=0.2, prompt_dropout_per_sample=True),
                         options=LAYOUTS["different"])
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    labels = torch.tensor([0, 1, 2, 0, 1], device="cuda")
    results = []
    for backend in ("triton", "torch"):
        bank = tk.PromptBank(tiny_vit(), folders, backend=backend).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(2)  # the same prompt dropout masks
            out = bank(x, ORDERS["mixed"])
            loss = bank.loss(out, labels)
        trainable = [p for p in bank.parameters() if p.requires_grad]
        results.append((out.logits.float(), torch.autograd.grad(loss, trainable)))
    atol, rtol = (2e-2, 5e-2) if autocast else (1e-4, 1e-3)
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg.float(), atol=atol * float(rg.abs().max()), rtol=rtol)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prompt_kv_kernels_match_fp64_at_vit_b(dtype, p, monkeypatch):
    """The prompt K/V pass's kernels (one launch each way) at ViT-B/16's width, 12 layers and 36 prompts, in bf16
    (which the interpreter cannot run) and fp32 (3xTF32), with and without the prompt dropout they draw themselves
    (compiled Philox), against fp64 from the definition."""
    import timm

    from tcpa_kernels import _prompt_kv
    from tcpa_kernels.vit import state_of
    from tests._philox import philox_multipliers, recorded_seeds
    from tests.test_prompt_kv_kernels import random_affines, reference_kv

    torch.manual_seed(0)
    model = random_affines(timm.create_model("vit_base_patch16_224", pretrained=False))
    model = tk.apply_tcpa(model, backend="triton", prompt_dropout=p).to("cuda", dtype).train()
    params = _prompt_kv.prompt_parameters(state_of(model))
    seeds = recorded_seeds(monkeypatch)
    kv = _prompt_kv.all_layers_kv(state_of(model), 8)
    assert len(seeds) == (1 if p else 0)
    ref = reference_kv(model, philox_multipliers(seeds[0], (len(kv), kv[0].shape[-2], model.embed_dim), p) if p
                     else None)
    weights = [torch.randn(r.shape, dtype=torch.float64, device="cuda") for r in ref]
    grads = torch.autograd.grad(sum((k.double() * w).sum() for k, w in zip(kv, weights)), params)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    tolerance = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for k, r in zip(kv, ref):
        torch.testing.assert_close(k.double() / r.abs().max(), r / r.abs().max(), **tolerance)
    for g, rg in zip(grads, ref_grads):
        scale = rg.double().abs().max()
        torch.testing.assert_close(g.double() / scale, rg.double() / scale, **tolerance)
