"""Work model of the attention kernels, next to FlashAttention-2 on the same N+P keys (no GPU needed).

For each direction (forward, backward) of one attention layer: the tensor-core work of the padded tiles the
kernels execute (MMA FLOPs), the exp2 evaluations, the minimum HBM bytes (every operand read or written once; the
fp32 scratch both sides keep, counted apart because it mostly lives in L2) and the launches. The TCPA figures come
from the library's own launch configurations and loop structure (``tests/test_work_model.py`` checks them against
what the kernels execute in the Triton interpreter); FlashAttention-2's from its tile sizes and its 2 / 5 MMAs per
tile pair, on a key sequence of N + P tokens already built (the baseline of TCPA_SPEC.md §6).

    python benchmarks/work_model.py          # the §6 and ViT-L shapes, bf16, as ratios TCPA / FA2
"""

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tcpa_kernels.ops import _attention_kernels as kernels  # noqa: E402

MMAS_PER_TILE_PAIR = {"fwd": 2, "bwd": 5}  # fwd: S = QK^T, PV; bwd: S, dP = dO V^T, dV, dK, dQ (both sides)
# FlashAttention-2's (query, key) tiles for 16-bit operands on sm80+, by head dim (its launch templates)
FA2_TILES = {32: {"fwd": (128, 128), "bwd": (128, 128)}, 64: {"fwd": (128, 128), "bwd": (128, 128)},
             96: {"fwd": (128, 64), "bwd": (64, 128)}, 128: {"fwd": (128, 64), "bwd": (64, 128)}}
FA2_HEAD_DIMS = (32, 64, 96, 128)  # it pads the head dim up to one of these
# (label, B, H, N, P, D): TCPA_SPEC.md §6 (ViT-B/16, 224 px, Pc = Pi = 18, L = 1), ViT-L/16 at 224 and 384 px
SHAPES = [("vit_b16_b128_n197_p36", 128, 12, 197, 36, 64), ("vit_l16_b64_n197_p36", 64, 16, 197, 36, 64),
          ("vit_l16_b32_n577_p200", 32, 16, 577, 200, 64)]
WORD_BYTES = 8  # one int64 selection word per token
FP32 = 4


@dataclass
class Work:
    mma_flops: int  # padded tiles x MMAs per tile pair x 2*M*N*K
    exp2: int  # exp2 evaluations (probabilities, and the forward's rescale factors)
    hbm_bytes: int  # every input read once, every output written once
    scratch_bytes: int  # fp32 scratch written and read (delta, dq partials): L2 traffic at ViT sizes
    launches: int  # kernels, plus the small aten kernels around them


def _tile_work(direction, programs_pairs, block_m, block_n, d_pad):
    mma = programs_pairs * MMAS_PER_TILE_PAIR[direction] * 2 * block_m * block_n * d_pad
    rescale = programs_pairs * block_m if direction == "fwd" else 0  # exp2(m_old - m_new) per row and key tile
    return mma, programs_pairs * block_m * block_n + rescale


def tcpa(B, H, N, P, D, dtype=torch.bfloat16, prompt_dtype=torch.float32, shared_prompts=True, deterministic=True):
    """{'fwd': Work, 'bwd': Work} of the library's kernels (selection words; prompts shared or per sample)."""
    size, prompt_size = torch.finfo(dtype).bits // 8, torch.finfo(prompt_dtype).bits // 8
    tokens = B * H * N * D * size  # one [B, H, N, D] operand
    prompt_copies = H if shared_prompts else B * H
    prompts = 2 * prompt_copies * P * D * prompt_size  # prompt K and V
    work = {}
    for direction in ("fwd", "bwd"):
        cfg = kernels.launch_config(direction, N, P, D, dtype)
        block_m, block_n, d_pad = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["D_PAD"]
        query_blocks, key_tiles = math.ceil(N / block_m), math.ceil((N + P) / block_n)
        mma, exp2 = _tile_work(direction, B * H * query_blocks * key_tiles, block_m, block_n, d_pad)
        if direction == "fwd":  # q, k, v, prompts, words -> out, lse
            work[direction] = Work(mma, exp2, 4 * tokens + prompts + B * N * WORD_BYTES + B * H * N * FP32, 0, 1)
            continue
        # q, k, v, out, dO, lse, prompts, words -> dq, dk, dv, prompt gradients
        dq_partials = 2 * (key_tiles - 1) * B * H * N * D * FP32  # stored by every key tile but the last, read back
        scratch = 2 * B * H * N * FP32 + dq_partials  # delta written, read
        prompt_grads = 2 * prompt_copies * P * D * FP32
        if shared_prompts and deterministic:  # per-(b, h) partials written, read by the batch sum, which writes
            prompt_grads += 2 * (2 * B * H * P * D * FP32)
        elif shared_prompts:  # atomics: the target is zero-filled first
            prompt_grads *= 2
        hbm = 8 * tokens + B * H * N * FP32 + prompts + B * N * WORD_BYTES + prompt_grads
        extra = 1 if shared_prompts else 0  # the batch sum of the partials, or the zero-fill of the atomics' target
        work[direction] = Work(mma, exp2, hbm, scratch, 1 + extra)
    return work


def fa2(B, H, N, P, D, dtype=torch.bfloat16):
    """{'fwd': Work, 'bwd': Work} of FlashAttention-2 on N queries and N + P keys (no mask)."""
    size = torch.finfo(dtype).bits // 8
    d_pad = next(d for d in FA2_HEAD_DIMS if d >= D)
    queries, keys = B * H * N * D * size, B * H * (N + P) * D * size
    work = {}
    for direction in ("fwd", "bwd"):
        block_m, block_n = FA2_TILES[d_pad][direction]
        pairs = B * H * math.ceil(N / block_m) * math.ceil((N + P) / block_n)
        mma, exp2 = _tile_work(direction, pairs, block_m, block_n, d_pad)
        if direction == "fwd":  # q, k, v -> out, lse
            work[direction] = Work(mma, exp2, 2 * queries + 2 * keys + B * H * N * FP32, 0, 1)
            continue
        # q, out, dO, k, v, lse -> dq, dk, dv; scratch: delta written and read; dq_accum zeroed, then every key
        # block's program adds its dq partial to it (atomics: read and written), and the convert kernel reads it
        key_blocks = math.ceil((N + P) / block_n)
        scratch = 2 * B * H * N * FP32 + (2 + 2 * key_blocks) * B * H * N * D * FP32
        hbm = 4 * queries + 4 * keys + B * H * N * FP32
        work[direction] = Work(mma, exp2, hbm, scratch, 3)  # preprocess (delta, zero dq_accum), main, dq convert
    return work


def ratios(ours, theirs):
    """{direction: {figure: TCPA / FA2}} of the two sides' Work; None where FA2's figure is 0."""
    return {d: {k: v / asdict(theirs[d])[k] if asdict(theirs[d])[k] else None for k, v in asdict(ours[d]).items()}
            for d in ours}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-sample", action="store_true", help="prompts per sample ([B, H, P, D]) instead of shared")
    args = parser.parse_args(argv)
    print("TCPA kernels / FlashAttention-2 on N+P keys, bf16 (work model, no GPU)")
    print(f"{'shape':24s} {'dir':4s} {'MMA':>6s} {'exp2':>6s} {'HBM':>6s} {'scratch':>8s} {'launches':>9s}")
    for label, *dims in SHAPES:
        ours, theirs = tcpa(*dims, shared_prompts=not args.per_sample), fa2(*dims)
        for direction, r in ratios(ours, theirs).items():
            o, t = ours[direction], theirs[direction]
            print(f"{label:24s} {direction:4s} {r['mma_flops']:6.3f} {r['exp2']:6.3f} {r['hbm_bytes']:6.3f} "
                  f"{r['scratch_bytes'] or 0:8.3f} {o.launches:4d} / {t.launches}")
            print(f"{'':29s} TCPA {o.mma_flops / 1e9:.1f} GF, {o.exp2 / 1e9:.2f} G exp2, {o.hbm_bytes / 1e6:.0f} MB "
                  f"(+{o.scratch_bytes / 1e6:.0f} MB scratch) | FA2 {t.mma_flops / 1e9:.1f} GF, "
                  f"{t.exp2 / 1e9:.2f} G exp2, {t.hbm_bytes / 1e6:.0f} MB (+{t.scratch_bytes / 1e6:.0f} MB scratch)")

if __name__ == "__main__":
    main()
