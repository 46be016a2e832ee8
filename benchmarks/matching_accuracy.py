"""Does matching on tensor cores keep the fp64 ranking? Selection agreement and loss-term error of the matching
kernels' arithmetic against fp64, per input dtype, on two data sets.

    python benchmarks/matching_accuracy.py                    # CPU: an emulation of the kernels' arithmetic
    python benchmarks/matching_accuracy.py --weights runs/fmnist/pretrain/last.safetensors --out benchmarks/results

The matching kernels compute the x . key products on tensor cores with fp32 accumulation (``_match_kernels``):
fp32 x as 3xTF32 (x and the keys each split into a TF32 high and low part; the three products hi*hi, hi*lo, lo*hi),
16-bit x (exact in its dtype) against the keys split into a high and a low part in x's dtype (two MMAs). On CUDA
this script runs the kernels themselves (``match_select(backend="triton")``). Off CUDA it runs an emulation of
that arithmetic in PyTorch, labelled as such: operands rounded as the GPU rounds them (Triton's tf32x3: the high
part ``cvt.rna.tf32.f32``, 10 mantissa bits, to nearest, ties away; the low part the fp32 remainder, of which a
TF32 MMA reads the top 10 mantissa bits), each partial product in an fp32 matmul; the emulation does not model the
order or the rounding of the tensor cores' own accumulation. The fp32 CUDA-core (IEEE) arithmetic of
the kernels before them is emulated beside, as the baseline, and so is one MMA pass without the low parts
("one_pass"), for contrast: what the split buys.

Data sets (tokens of every layer input, pools 18 + 18, top-10, one prefix token):
- ``random``: x ~ N(0, 1) at ViT-B/16 shape ([B, 197, 768]), keys uniform(-1, 1) as the pools are initialised;
- ``trained``: the block inputs of a trained backbone, every layer (``--weights``: the pretrained ViT of
  ``examples/fashion_mnist_transfer.py`` on Fashion-MNIST validation images), against keys as initialised and
  against keys drawn from the activations themselves (each key a token of another image: close competition, as
  keys that have learned the data).

For each token: the selected set against the fp64 top-k of the same (dtype-rounded) inputs. A token whose set
differs is a near tie when the fp64 scores of its k-th and (k+1)-th entries differ by at most the rounding error
of a length-C dot product in the input dtype, ``tau = sqrt(C) * u * (a_k + a_k+1)`` with ``a_e = sum_c |x_c k_ec| /
(|x| |k_e|)`` and u the dtype's unit roundoff (the probabilistic bound of Higham and Mary, 2019, with lambda = 1).
Reported: tokens compared, tokens whose set differs, of those outside the near-tie set (the target is 0), the
largest fp64 gap of a differing token in units of tau, and the largest error of the loss terms relative to their
largest magnitude.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tcpa_kernels as tk  # noqa: E402
from tcpa_kernels.ops.match_select import EPS, group_weights  # noqa: E402

POOLS, TOPK = (18, 18), (10, 10)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ the kernels' arithmetic


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 t rounded to TF32 (10 mantissa bits), to nearest with ties away from zero (``cvt.rna.tf32.f32``)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def truncate_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 t as a TF32 MMA reads an fp32 register: the low 13 mantissa bits dropped."""
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def emulated_dots(x: torch.Tensor, keys: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """x [M, C] (fp32 or 16-bit) . keys [E, C] (fp32) -> [M, E] fp32 as the kernels compute it: "ieee" (fp32 FMA),
    "tensor_cores" (3xTF32 for fp32 x, keys split in x's 16-bit dtype otherwise); and, for contrast, "one_pass"
    (one MMA: TF32 operands for fp32 x, the keys rounded to x's 16-bit dtype otherwise)."""
    if arithmetic == "ieee":
        return x.float() @ keys.T
    if arithmetic == "one_pass":
        if x.dtype == torch.float32:
            return round_tf32(x) @ round_tf32(keys).T
        return x.float() @ keys.to(x.dtype).float().T
    if x.dtype == torch.float32:  # Triton's tf32x3: hi = cvt.rna(a), lo = a - hi; lo*hi, then hi*lo, then hi*hi
        x_hi, k_hi = round_tf32(x), round_tf32(keys)
        x_lo, k_lo = truncate_tf32(x - x_hi), truncate_tf32(keys - k_hi)
        return (x_lo @ k_hi.T + x_hi @ k_lo.T) + x_hi @ k_hi.T
    k_hi = keys.to(x.dtype)
    k_lo = (keys - k_hi.float()).to(x.dtype)
    return x.float() @ k_hi.float().T + x.float() @ k_lo.float().T


def kernel_selection(x: torch.Tensor, keys_cls: torch.Tensor, keys_img: torch.Tensor, arithmetic: str):
    """(selected bool [B, N, E], loss terms [B, N]) of x [B, N, C]: the kernels on CUDA ("tensor_cores"), else the
    emulation of their arithmetic."""
    if x.device.type == "cuda" and arithmetic == "tensor_cores":
        bits, terms = tk.match_select(x, keys_cls, keys_img, topk_cls=TOPK[0], topk_img=TOPK[1], backend="triton")
        E = keys_cls.shape[0] + keys_img.shape[0]
        selected = ((bits[..., None] >> torch.arange(E, device=x.device)) & 1).bool()
        return selected, terms.double()
    keys = torch.cat([keys_cls, keys_img])
    B, N, C = x.shape
    dots = emulated_dots(x.reshape(B * N, C), keys, arithmetic).view(B, N, -1)
    x_norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp_min(EPS)
    cos = dots / (x_norm * torch.linalg.vector_norm(keys, dim=-1).clamp_min(EPS))
    selected = top_k(cos.double())
    return selected, loss_terms(cos.double(), selected)


def top_k(cos: torch.Tensor) -> torch.Tensor:
    """bool [B, N, E]: each token's top-k of its own pool (CLS pool for token 0, image pool for the others)."""
    selected = torch.zeros_like(cos, dtype=torch.bool)
    pc = POOLS[0]
    for tokens, pool, k in ((slice(0, 1), slice(0, pc), TOPK[0]), (slice(1, None), slice(pc, None), TOPK[1])):
        index = cos[:, tokens, pool].topk(k, dim=-1).indices + pool.start
        selected[:, tokens].scatter_(-1, index, True)
    return selected


def loss_terms(cos: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    B, N, _ = cos.shape
    w_cls, w_img = group_weights(B, N, 1, *TOPK)
    weights = torch.full((N,), w_img, dtype=cos.dtype, device=cos.device)
    weights[0] = w_cls
    return torch.where(selected, 1 - cos, 0).sum(-1) * weights


# ----------------------------------------------------------------------------------------------- comparison


def compare(x: torch.Tensor, keys_cls: torch.Tensor, keys_img: torch.Tensor, arithmetic: str) -> dict:
    """The figures of one data set, dtype and arithmetic (x in its dtype, keys fp32)."""
    keys = torch.cat([keys_cls, keys_img]).double()
    x64 = x.double()
    cos = (x64 @ keys.T) / (x64.norm(dim=-1, keepdim=True) * keys.norm(dim=-1))  # [B, N, E] fp64
    abs_dot = (x64.abs() @ keys.abs().T) / (x64.norm(dim=-1, keepdim=True) * keys.norm(dim=-1))
    want = top_k(cos)
    got, terms = kernel_selection(x, keys_cls, keys_img, arithmetic)
    differs = (got != want).any(-1)  # [B, N]
    C = x.shape[-1]
    tau = C**0.5 * UNIT_ROUNDOFF[x.dtype]
    gaps = []
    for b, n in differs.nonzero().tolist():
        pool = slice(0, POOLS[0]) if n == 0 else slice(POOLS[0], None)
        k = TOPK[0] if n == 0 else TOPK[1]
        order = cos[b, n, pool].argsort(descending=True)
        kth, next_ = order[k - 1] + pool.start, order[k] + pool.start
        gap = float(cos[b, n, kth] - cos[b, n, next_])
        gaps.append(gap / (tau * float(abs_dot[b, n, kth] + abs_dot[b, n, next_])))
    want_terms = loss_terms(cos, want)
    return {"tokens": differs.numel(), "differing": len(gaps), "outside_near_ties": sum(g > 1 for g in gaps),
            "largest_gap_in_tau": max(gaps, default=None),
            "terms_max_rel_error": float((terms.cpu() - want_terms.cpu()).abs().max() / want_terms.abs().max())}


def random_set(batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 197, 768, generator=g)
    keys = torch.empty(sum(POOLS), 768).uniform_(-1, 1, generator=g)
    return [("random", x.to(device), keys.to(device))]


def trained_sets(weights: str, images: int, device, seed: int = 0):
    """The block inputs of every layer of the pretrained Fashion-MNIST ViT, against initialised keys and keys drawn
    from the activations."""
    import timm
    from safetensors.torch import load_file

    from tcpa_kernels.data import GreyTransform, fashion_mnist, model_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=96,
                              depth=6, num_heads=3, num_classes=5)
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"--weights: expected the pretrained backbone of examples/fashion_mnist_transfer.py, got "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.eval().to(device)
    val = fashion_mnist("val", GreyTransform(model_data_config(model, 28)), classes=range(5))
    batch = torch.stack([image for image, _ in val.__getitems__(list(range(images)))]).to(device)
    inputs = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(batch)
    x = torch.cat(inputs)  # every layer's input, [layers * images, N, C]
    g = torch.Generator().manual_seed(seed)
    init_keys = torch.empty(sum(POOLS), x.shape[-1]).uniform_(-1, 1, generator=g).to(device)
    tokens = x.flatten(0, 1)
    drawn = tokens[torch.randint(0, tokens.shape[0], (sum(POOLS),), generator=g).to(device)].float()
    return [("trained, init keys", x, init_keys), ("trained, keys from tokens", x, drawn)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="images of the random set (default 16)")
    parser.add_argument("--weights", help="the pretrained backbone of examples/fashion_mnist_transfer.py")
    parser.add_argument("--images", type=int, default=256, help="validation images for --weights (default 256)")
    parser.add_argument("--out", help="write matching-accuracy-<device>.json here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = "kernels" if device.type == "cuda" else "CPU emulation of the kernels' arithmetic"
    sets = random_set(args.batch, device) + (trained_sets(args.weights, args.images, device) if args.weights else [])
    rows = []
    for name, x, keys in sets:
        for dtype_name, dtype in DTYPES.items():
            arithmetics = ("ieee", "tensor_cores") if dtype == torch.float32 else ("tensor_cores",)
            for arithmetic in arithmetics + (() if device.type == "cuda" else ("one_pass",)):
                keys32 = keys.float()
                figures = compare(x.to(dtype), keys32[:POOLS[0]], keys32[POOLS[0]:], arithmetic)
                rows.append({"data": name, "dtype": dtype_name, "arithmetic": arithmetic, **figures})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"Matching selection against fp64 ({where}; pools 18 + 18, top-10)", "",
             "| data | x dtype | arithmetic | tokens | differing | outside near ties | largest gap / tau | "
             "loss terms max rel. error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "-" if r["largest_gap_in_tau"] is None else f"{r['largest_gap_in_tau']:.3g}"
        lines.append(f"| {r['data']} | {r['dtype']} | {r['arithmetic']} | {r['tokens']:,} | {r['differing']} | "
                     f"{r['outside_near_ties']} | {gap} | {r['terms_max_rel_error']:.2e} |")
    print("\n".join(lines))
    if args.out:
        slug = torch.cuda.get_device_name().replace(" ", "-").lower() if device.type == "cuda" else "cpu-emulation"
        payload = {"where": where, "device": slug, "torch": torch.__version__, "platform": platform.platform(),
                   "args": vars(args), "rows": rows}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"matching-accuracy-{slug}.json").write_text(json.dumps(payload, indent=2))
    return rows


if __name__ == "__main__":
    main()
