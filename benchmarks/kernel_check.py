"""One forward + backward of every Triton kernel of the library, for compute-sanitizer and Nsight Compute.

    compute-sanitizer --tool memcheck python benchmarks/kernel_check.py        # small odd shapes, every variant
    compute-sanitizer --tool racecheck python benchmarks/kernel_check.py
    ncu --profile-from-start off ... python benchmarks/kernel_check.py --spec  # §6 shape (docs/how-it-works.md), bf16

Small (default): attention with a bool mask and with selection words, shared and per-sample prompts, both
``renormalize`` modes, deterministic and atomic prompt gradients; a two-layer timm ViT on the lean path (match
kernels with the fused LayerNorm, packed attention on timm's qkv view, shared and per-sample prompt K/V).
``--spec``: the fused op (top-k words + attention) at the §6 shape and one ViT-B/16 layer at batch 128 under bf16
autocast. Every workload runs once to compile, then once more between cudaProfilerStart/Stop (what ncu
profiles with ``--profile-from-start off``). Each run is synchronised, so a kernel fault names its workload.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.interpreter  # noqa: E402, F401  (the Triton interpreter where there is no GPU)
import tcpa_kernels as tk  # noqa: E402
from tcpa_kernels import bench  # noqa: E402


def _backward(out, leaves):
    torch.autograd.grad(out.float().square().sum(), leaves)


def op_workload(B, H, N, P, D, dtype, device, *, words, shared, renormalize, deterministic):
    """tcpa_attention (bool mask) or tcpa_fused_attention (selection words from scores): forward + backward."""
    g = torch.Generator().manual_seed(0)
    prompt_shape = (H, P, D) if shared else (B, H, P, D)
    leaves = [torch.randn(*s, generator=g).to(device, dtype).requires_grad_()
              for s in [(B, H, N, D)] * 3 + [prompt_shape] * 2]
    if words:
        pool, length = bench.op_pool_layout(P)
        scores = torch.rand(B, N, 2 * pool, generator=g).to(device)
        return lambda: _backward(tk.tcpa_fused_attention(
            *leaves, scores, pool_cls=pool, topk_cls=min(2, pool), topk_img=min(2, pool), prompt_len_cls=length,
            prompt_len_img=length, renormalize=renormalize, deterministic=deterministic, backend="triton")[0], leaves)
    mask = (torch.rand(B, N, P, generator=g) < 0.5).to(device)
    return lambda: _backward(tk.tcpa_attention(*leaves, mask, renormalize=renormalize, deterministic=deterministic,
                                               backend="triton"), leaves)


def vit_workload(device, *, embed_dim, depth, heads, img_size, patch, batch, pools, topk, per_sample, autocast):
    """A timm ViT on the lean fused path in train mode: forward, matching loss, backward."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=embed_dim, depth=depth,
                              num_heads=heads, num_classes=10).to(device)
    options = dict(prompt_dropout=0.1, prompt_dropout_per_sample=True) if per_sample else {}
    model = tk.apply_tcpa(model, pool_size_cls=pools, pool_size_img=pools, topk_cls=topk, topk_img=topk,
                          backend="triton", **options).train()
    images = torch.randn(batch, 3, img_size, img_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(images).float().square().mean() + tk.get_matching_loss(model)
        torch.autograd.grad(loss, tk.trainable_parameters(model))

    return step


def workloads(spec: bool, device) -> dict:
    """name -> closure running one forward + backward."""
    if spec:
        dims = {k: v for k, v in bench.SPEC_OP_SHAPE.items() if k != "topk"}
        return {
            "fused_op_bf16": op_workload(**dims, dtype=torch.bfloat16, device=device, words=True, shared=True,
                                         renormalize=False, deterministic=True),
            "vit_b_layer_bf16": vit_workload(device, embed_dim=768, depth=1, heads=12, img_size=224, patch=16,
                                             batch=128, pools=18, topk=10, per_sample=False, autocast=True),
        }
    small = dict(B=2, H=3, N=37, P=10, D=40, device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    found = {}
    for words in (False, True):
        for shared in (True, False):
            for renormalize in (False, True):
                name = f"{'words' if words else 'mask'}_{'shared' if shared else 'per_sample'}_renorm{int(renormalize)}"
                found[name] = op_workload(**small, dtype=dtype, words=words, shared=shared,
                                          renormalize=renormalize, deterministic=True)
    found["mask_shared_atomic"] = op_workload(**small, dtype=dtype, words=False, shared=True, renormalize=False,
                                              deterministic=False)
    for per_sample in (False, True):
        found[f"vit_lean_{'per_sample' if per_sample else 'shared'}"] = vit_workload(
            device, embed_dim=48, depth=2, heads=3, img_size=20, patch=4, batch=2, pools=3, topk=2,
            per_sample=per_sample, autocast=False)
    return found


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", action="store_true", help="the §6 shapes (a GPU) instead of small odd ones")
    args = parser.parse_args(argv)
    device = bench.default_device()
    runs = workloads(args.spec, device)
    for name, run in runs.items():  # compile, and a first check
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"ran {name}", flush=True)
    if device.type == "cuda":
        torch.cuda.profiler.start()
        for run in runs.values():
            run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return list(runs)


if __name__ == "__main__":
    main()
