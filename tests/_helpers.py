"""Helpers shared by the model-level test files."""

import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

import tcpa_kernels as tk


def assert_prompted_matches_reference(model_loss, reference_loss, params):
    """A prompted model's (output, matching loss) against the fp64 official-style computation's: the outputs (atol
    1e-10), the matching losses and the gradient of ``output.square().sum() + matching loss`` in every parameter of
    ``params`` (atol 1e-9). A parameter neither graph uses (the CLS pool of a model without prefix tokens) counts as
    a zero gradient; at least half the parameters must have a nonzero reference gradient."""
    grads = []
    for out, match in (model_loss, reference_loss):
        grads.append(torch.autograd.grad(out.square().sum() + match, params, allow_unused=True))
    (out, match), (ref, ref_match) = model_loss, reference_loss
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(match, ref_match, atol=1e-12, rtol=1e-10)
    assert sum(int(rg is not None and rg.abs().sum() > 0) for rg in grads[1]) >= len(params) // 2
    for p, g, rg in zip(params, *grads):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if g is None else g, zero if rg is None else rg, atol=1e-9, rtol=1e-7)


def assert_backends_agree(make_model, x, atol, rtol):
    """``make_model(backend)`` with the Triton kernels against the torch backend on the same parameters: logits,
    matching loss and every trainable gradient (gradients with atol relative to their largest magnitude)."""
    results = []
    for backend in ("triton", "torch"):
        model = make_model(backend)
        logits = model(x)
        loss = logits.square().mean() + tk.get_matching_loss(model)
        results.append((logits, tk.get_matching_loss(model), torch.autograd.grad(loss, tk.trainable_parameters(model))))
    (logits, match, grads), (ref_logits, ref_match, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=rtol)
    torch.testing.assert_close(match, ref_match, atol=atol, rtol=rtol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg.float(), atol=atol * float(rg.abs().max()), rtol=rtol)


SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)
ROPE = dict(use_rot_pos_emb=True, ref_feat_shape=4, use_abs_pos_emb=False)

TIMM_FAMILIES = {  # small timm models (no weights) of every supported block family
    "vit_block": lambda: VisionTransformer(**SMALL, reg_tokens=1, qk_norm=True),
    "vit_res_post_block": lambda: VisionTransformer(**SMALL, block_fn=ResPostBlock),
    "vit_parallel_things_block": lambda: VisionTransformer(**SMALL, block_fn=ParallelThingsBlock, init_values=0.5),
    "vit_parallel_scaling_block": lambda: VisionTransformer(**SMALL, block_fn=ParallelScalingBlock, qk_norm=True),
    # EVA-02: RoPE, separate q/k/v projections, SwiGLU, scale norms
    "eva02": lambda: Eva(**SMALL, **ROPE, qkv_fused=False, swiglu_mlp=True, scale_mlp=True),
    # EVA with fused qkv and separate q/v biases, a class token and registers
    "eva_fused_qkv_registers": lambda: Eva(**SMALL, **ROPE, num_reg_tokens=2, qkv_fused=True),
    # DINOv3-style: AttentionRope, grouped K/V heads, registers, layer scale, dinov3 rope, half rotation
    "eva_rope_gqa_dinov3": lambda: Eva(**(SMALL | dict(num_heads=4)), attn_type="rope", num_kv_heads=2,
                                       qkv_fused=False, num_reg_tokens=2, init_values=0.5, use_rot_pos_emb=True,
                                       use_abs_pos_emb=False, rope_type="dinov3", rope_rotate_half=True),
    # Perception-Encoder-style: pre-transformer norm, gated attention, no class token (avg pool)
    "eva_pe_gated": lambda: Eva(**SMALL, **ROPE, attn_type="rope", use_pre_transformer_norm=True, class_token=False,
                                global_pool="avg"),
    "eva_post_norm": lambda: Eva(**SMALL, **ROPE, use_post_norm=True),
}
