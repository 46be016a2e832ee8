"""Work model of the attention kernels, next to FlashAttention-2 on the same N+P keys (no GPU needed).

For each direction (forward, backward) of one attention layer: the tensor-core work of the padded tiles the
kernels execute (MMA FLOPs), the exp2 evaluations, the minimum HBM bytes (every operand read or written once; the
fp32 scratch both sides keep, counted apart because it mostly lives in L2) and the launches. The TCPA figures come
from the library's own launch configurations and loop structure (``tests/test_work_model.py`` checks them against
what the kernels execute in the Triton interpreter); FlashAttention-2's from its tile sizes and its 2 / 5 MMAs per
tile pair, on a key sequence of N + P tokens already built (the baseline of docs/how-it-works.md, 'Targets').

Whole layer (``layer``, ``--section layer``): one timm pre-norm ``Block`` per train step of a frozen backbone
(input gradients only; the prompts and keys get theirs), TCPA's next to the no-prompt layer's, as a list of
``Kernel`` per component and direction: tensor-core FLOPs by rate (16-bit; TF32, 3xTF32 counting its 3 MMAs), fp32
CUDA-core FLOPs where material, exp2, minimum HBM bytes and launches. Components: norm1 (LayerNorm) | the matching
kernels (norm1 fused in; padded to E_PAD and the kernels' row and channel tiles, their MMA passes as executed);
FlashAttention-2 on N keys | the TCPA attention on N + P (the model above); the GEMMs (qkv, proj, fc1, fc2, 2*M*N*K)
and the elementwise kernels, the same in both; the prompt K/V of all L layers and the loss-term sum (once per
forward, divided by L); the key-gradient partials' sum. Assumptions (the §6 setting, bf16 autocast):

- fp32 parameters and residual stream x; h = norm(x) fp32 in both layers (``F.layer_norm`` under autocast; the
  matching kernel writes h in x's dtype), so its dots are 3xTF32; autocast casts h, each frozen weight and bias to
  bf16 every forward (frozen weights are not in its cache) and the GEMMs, attention and GELU run in bf16; the
  backward casts the gradients back and forth at those casts (fp32 dh for norm1 | matching).
- the no-prompt backward packs FA2's dq, dk, dv into qkv's gradient (unbind's stack, then a copy for the reshape);
  TCPA's attention writes it in place. Its prompt-gradient partials' batch sum is in the attention's figures.
- the prompt K/V projection runs in fp32 outside autocast (``_prompt_kv.py``), as the triton backend runs it: one
  kernel each way for all layers (``ops/_prompt_kv_kernels.py``: 3xTF32 dots, the weights read in place; the
  backward reads them twice, once per pass over C); no prompt dropout (drawn inside those kernels, it adds
  Philox arithmetic on CUDA cores to them and no traffic).
- bytes: every operand read once, every result written once; fp32 scratch (the attention's) left out, as in L2.
- time: a roofline per kernel, max(tensor-core time, CUDA-core time, exp2 time, HBM time) at the H100 SXM5 peak
  rates below, plus a fixed cost per launch, summed. A model, not a measurement: real kernels reach a fraction of
  peak, and launches overlap the GPU's work when it is busy.

    python benchmarks/work_model.py          # the §6 and ViT-L shapes, bf16, as ratios TCPA / FA2; the layer
    python benchmarks/work_model.py --section layer    # the whole layer only, at §6 (batch 128) and batch 8
"""

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tcpa_kernels.ops import _attention_kernels as kernels  # noqa: E402
from tcpa_kernels.ops import _match_kernels as match_kernels  # noqa: E402
from tcpa_kernels.ops import _prompt_kv_kernels as prompt_kv_kernels  # noqa: E402
from tcpa_kernels.ops.selection import max_topk  # noqa: E402

MMAS_PER_TILE_PAIR = {"fwd": 2, "bwd": 5}  # fwd: S = QK^T, PV; bwd: S, dP = dO V^T, dV, dK, dQ (both sides)
# FlashAttention-2's (query, key) tiles for 16-bit operands on sm80+, by head dim (its launch templates)
FA2_TILES = {32: {"fwd": (128, 128), "bwd": (128, 128)}, 64: {"fwd": (128, 128), "bwd": (128, 128)},
             96: {"fwd": (128, 64), "bwd": (64, 128)}, 128: {"fwd": (128, 64), "bwd": (64, 128)}}
FA2_HEAD_DIMS = (32, 64, 96, 128)  # it pads the head dim up to one of these
# (label, B, H, N, P, D): docs/how-it-works.md, 'Targets' (ViT-B/16, 224 px, Pc = Pi = 18, L = 1), ViT-L/16 at 224 and
# 384 px
SHAPES = [("vit_b16_b128_n197_p36", 128, 12, 197, 36, 64), ("vit_l16_b64_n197_p36", 64, 16, 197, 36, 64),
          ("vit_l16_b32_n577_p200", 32, 16, 577, 200, 64)]
WORD_BYTES = 8  # one int64 selection word per token
FP32, BF16 = 4, 2


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


def attention_report(per_sample: bool) -> None:
    print("TCPA kernels / FlashAttention-2 on N+P keys, bf16 (work model, no GPU)")
    print(f"{'shape':24s} {'dir':4s} {'MMA':>6s} {'exp2':>6s} {'HBM':>6s} {'scratch':>8s} {'launches':>9s}")
    for label, *dims in SHAPES:
        ours, theirs = tcpa(*dims, shared_prompts=not per_sample), fa2(*dims)
        for direction, r in ratios(ours, theirs).items():
            o, t = ours[direction], theirs[direction]
            print(f"{label:24s} {direction:4s} {r['mma_flops']:6.3f} {r['exp2']:6.3f} {r['hbm_bytes']:6.3f} "
                  f"{r['scratch_bytes'] or 0:8.3f} {o.launches:4d} / {t.launches}")
            print(f"{'':29s} TCPA {o.mma_flops / 1e9:.1f} GF, {o.exp2 / 1e9:.2f} G exp2, {o.hbm_bytes / 1e6:.0f} MB "
                  f"(+{o.scratch_bytes / 1e6:.0f} MB scratch) | FA2 {t.mma_flops / 1e9:.1f} GF, "
                  f"{t.exp2 / 1e9:.2f} G exp2, {t.hbm_bytes / 1e6:.0f} MB (+{t.scratch_bytes / 1e6:.0f} MB scratch)")


# ------------------------------------------------------------------------------------------- the whole layer

# H100 SXM5 peak rates: NVIDIA H100 Tensor Core GPU datasheet, SXM5 column, dense (without sparsity); the exp2 rate
# from FlashAttention-3 (Shah et al. 2024, §1: "989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special
# functions"); the launch cost an assumption (PyTorch eager dispatch and launch of one kernel).
TC16_RATE = 989e12  # bf16 / fp16 tensor-core FLOP/s
TF32_RATE = 494e12  # TF32 tensor-core FLOP/s
CUDA_RATE = 67e12  # fp32 CUDA-core FLOP/s (an FMA counts 2)
EXP2_RATE = 3.9e12  # special-function unit (MUFU) evaluations/s
HBM_RATE = 3.35e12  # HBM3 bytes/s
LAUNCH_S = 4e-6  # seconds per kernel launch
SM_COUNT = 132  # H100 SXM5: the matching backward's programs (one key-gradient partial each)
TOPK_OPS = 4  # CUDA-core ops per [row, E_PAD] entry and argmax pass of select_topk: max, == best, pick, knock out


@dataclass(frozen=True)
class Kernel:
    """One kernel, or a few memory-bound ones lumped (``launches``), per layer; floats: per-model work / L."""

    tc16: float = 0  # tensor-core FLOPs at the 16-bit rate (padded as executed)
    tf32: float = 0  # tensor-core FLOPs at the TF32 rate (3xTF32: its 3 MMAs per product counted)
    cuda: float = 0  # fp32 CUDA-core FLOPs, where material
    exp2: float = 0
    hbm_bytes: float = 0
    launches: float = 1

    def seconds(self) -> float:
        """Roofline: the slowest unit or HBM, plus the launches."""
        compute = max(self.tc16 / TC16_RATE + self.tf32 / TF32_RATE, self.cuda / CUDA_RATE, self.exp2 / EXP2_RATE)
        return max(compute, self.hbm_bytes / HBM_RATE) + self.launches * LAUNCH_S

    def scaled(self, factor: float) -> "Kernel":
        return Kernel(**{k: v * factor for k, v in asdict(self).items()})


Component = dict[str, list[Kernel]]  # {'fwd': kernels, 'bwd': kernels}


@dataclass(frozen=True)
class LayerShape:
    """One ViT layer's train step: batch, heads, tokens, width, head dim, pools (one prompt per entry: P =
    pool_cls + pool_img), top-k of both pools, layers."""

    B: int
    H: int
    N: int
    C: int
    D: int
    pool_cls: int = 18
    pool_img: int = 18
    topk: int = 10
    L: int = 12
    num_prefix_tokens: int = 1

    @property
    def P(self) -> int:
        return self.pool_cls + self.pool_img


# docs/how-it-works.md, 'Targets' (ViT-B/16, 224 px, pools 18 + 18, top-k 10) and the same at batch 8
LAYER_SHAPES = [("vit_b16_b128 (§6)", LayerShape(128, 12, 197, 768, 64)),
                ("vit_b16_b8", LayerShape(8, 12, 197, 768, 64))]


def gemm(m: int, n: int, k: int, size: int = BF16, batch: int = 1, bias: bool = False, unit: str = "tc16") -> Kernel:
    """[m, k] @ [k, n] (+ bias [n]) -> [m, n], ``batch`` times, operands of ``size`` bytes, on ``unit``."""
    return Kernel(**{unit: 2 * batch * m * n * k}, hbm_bytes=batch * size * (m * k + k * n + m * n + bias * n))


def layer_norm(rows: int, C: int, size: int = FP32, backward: bool = False, affine: bool = True) -> Kernel:
    """LayerNorm of [rows, C] (input, output and gradients of ``size`` bytes; mean, rstd fp32; frozen affine).
    Forward: x -> h, mean, rstd; backward: dh, x, mean, rstd -> dx."""
    if backward:
        return Kernel(hbm_bytes=3 * rows * C * size + 2 * rows * FP32 + affine * C * FP32)
    return Kernel(hbm_bytes=2 * rows * C * size + 2 * rows * FP32 + affine * 2 * C * FP32)


def _ceil_to(n: int, block: int) -> int:
    return math.ceil(n / block) * block


def matching(s: LayerShape, x_size: int = FP32) -> Component:
    """``_match_fwd_kernel`` / ``_match_bwd_kernel`` with norm1 fused, as launched: dot passes over every padded
    [BLOCK_T, E_PAD] x [E_PAD, BLOCK_C] tile (forward: the cosines; backward: the cosines again, dkhat = g^T @ x and
    dx = g @ khat), each 3 TF32 MMAs (``_precise_dot``: 3xTF32) where both operands are fp32, 2 16-bit MMAs where
    one is a 16-bit x (the backward's dx pass: fp32 g and khat, 3xTF32 whatever x's dtype); the forward's top-k
    argmax passes on CUDA cores; the backward's fp32 key-gradient partials [E, C], one per program (programs:
    min(row blocks, SMs))."""
    M, C, E = s.B * s.N, s.C, s.P  # rows, channels, pool entries
    x16 = x_size == BF16
    x_unit, x_mmas = ("tc16", 2) if x16 else ("tf32", 3)  # a pass with x as an operand
    k_max = max_topk(s.N, s.num_prefix_tokens, s.topk, s.topk)
    side = E * C * FP32 + M * (WORD_BYTES + FP32)  # the keys; selection words and loss terms (or their grads)
    work = {}
    for direction, x_passes in (("fwd", 1), ("bwd", 2)):
        constexprs, _ = match_kernels._constexprs_and_options(direction, s.pool_cls, s.pool_img, x16)
        block_t, block_c, e_pad, _ = constexprs
        rows = _ceil_to(M, block_t)
        tile_pass = 2 * rows * e_pad * _ceil_to(C, block_c)  # 2*M*N*K of one MMA pass over every padded tile
        dots = {"tc16": 0, "tf32": 0}
        dots[x_unit] += x_passes * x_mmas * tile_pass
        if direction == "fwd":  # x -> h, mean, rstd, words, terms
            topk = TOPK_OPS * k_max * rows * e_pad
            work[direction] = [Kernel(**dots, cuda=topk, hbm_bytes=layer_norm(M, C, x_size).hbm_bytes + side)]
        else:  # x, dh, mean, rstd, words, dterms, the residual's gradient (fp32) -> dx, partials
            dots["tf32"] += 3 * tile_pass  # dx = g @ khat
            partials = match_kernels.backward_programs(M, SM_COUNT) * E * C * FP32
            norm = layer_norm(M, C, x_size, backward=True).hbm_bytes
            work[direction] = [Kernel(**dots, hbm_bytes=norm + side + partials + M * C * FP32)]
    return work


def _attention(work: dict[str, Work]) -> Component:
    return {d: [Kernel(tc16=w.mma_flops, exp2=w.exp2, hbm_bytes=w.hbm_bytes, launches=w.launches)]
            for d, w in work.items()}


def backbone(s: LayerShape, prompted: bool) -> dict[str, Component]:
    """The layer's GEMMs and elementwise kernels past norm1 and the attention: the same with and without prompts,
    but for the attention's residual gradient add, which TCPA's matching backward does (``prompted``)."""
    M, C = s.B * s.N, s.C
    row = M * C  # elements of one [B, N, C] tensor
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]  # (out, in) of qkv, proj, fc1, fc2
    gemms = {"fwd": [gemm(M, n, k, bias=True) for n, k in shapes], "bwd": [gemm(M, k, n) for n, k in shapes]}
    cast = Kernel(hbm_bytes=row * (FP32 + BF16))  # one [B, N, C] between fp32 and bf16
    add = Kernel(hbm_bytes=row * (2 * FP32 + BF16))  # residual: x fp32 + branch bf16 -> fp32
    params = sum(n * k + n for n, k in shapes)
    elementwise = {
        # casts of h and norm2's h, of 4 weights and 4 biases; 2 residual adds; norm2; GELU
        "fwd": [cast.scaled(2), Kernel(hbm_bytes=params * (FP32 + BF16), launches=8), add.scaled(2),
                layer_norm(M, C), Kernel(hbm_bytes=2 * 4 * row * BF16)],
        # gradient casts at the 2 residual branches and the 2 norms' outputs; GELU's; norm2's; 2 gradient adds (1
        # with prompts: the matching backward adds the attention's residual gradient)
        "bwd": [cast.scaled(4), Kernel(hbm_bytes=3 * 4 * row * BF16), layer_norm(M, C, backward=True),
                Kernel(hbm_bytes=3 * row * FP32).scaled(1 if prompted else 2)],  # fp32 + fp32 -> fp32
    }
    return {"GEMMs": gemms, "elementwise": elementwise}


def prompt_kv(s: LayerShape) -> Component:
    """The prompt K/V of all L layers, once per forward (fp32, outside autocast: ``_prompt_kv._kernel_kv``): the cat
    of the prompt tokens [L, P, C], then ``_kv_fwd_kernel`` (each layer's norm and the GEMM with its K/V rows
    [2C, C], read in place, 3xTF32 over tiles padded as launched) -> K/V [L, P, 2C], mean and rstd; backward: the
    layers' K/V gradients stacked (the unbind's backward), then ``_kv_bwd_kernel`` (the GEMM with the K/V rows in
    both of its passes over C, the norm's backward) -> the tokens' gradient [L, P, C]."""
    L, P, C, R = s.L, s.P, s.C, 2 * s.C
    tokens, kv, stats = L * P * C * FP32, L * P * R * FP32, 2 * L * P * FP32
    weights = L * R * C * FP32  # the layers' K/V rows
    work = {}
    for direction, passes in (("fwd", 1), ("bwd", 2)):
        launch = prompt_kv_kernels.LAUNCH[direction]
        padded = L * _ceil_to(P, launch["BLOCK_M"]) * _ceil_to(R, launch["BLOCK_R"]) * _ceil_to(C, launch["BLOCK_C"])
        mma = Kernel(tf32=passes * 3 * 2 * padded)
        if direction == "fwd":  # tokens, weights, norm weight + bias, bias -> K/V, mean, rstd
            work[direction] = [Kernel(hbm_bytes=2 * tokens),
                               Kernel(tf32=mma.tf32, hbm_bytes=tokens + weights + 2 * L * C * FP32 + L * R * FP32
                                      + kv + stats)]
        else:  # K/V gradients, tokens, weights (each pass), norm weight, mean, rstd -> the tokens' gradient
            work[direction] = [Kernel(hbm_bytes=2 * kv),
                               Kernel(tf32=mma.tf32, hbm_bytes=kv + tokens + passes * weights + L * C * FP32 + stats
                                      + tokens)]
    return {d: [k.scaled(1 / L) for k in kernels_] for d, kernels_ in work.items()}


def reductions(s: LayerShape) -> Component:
    """The loss terms [B, N] of all layers stacked and summed (once per forward, per layer: / L); the matching
    backward's key-gradient partials summed (torch ``sum(0)``). The prompt gradients' batch sum: in the attention."""
    M, E = s.B * s.N, s.P
    partials = match_kernels.backward_programs(M, SM_COUNT)
    return {"fwd": [Kernel(hbm_bytes=3 * s.L * M * FP32, launches=2).scaled(1 / s.L)],
            "bwd": [Kernel(hbm_bytes=(partials + 1) * E * s.C * FP32)]}


def layer(s: LayerShape, prompted: bool) -> dict[str, Component]:
    """{component: {'fwd': [Kernel], 'bwd': [Kernel]}} of one layer's train step, TCPA's (``prompted``) or the
    no-prompt layer's (no entry for what it does not run)."""
    M, C = s.B * s.N, s.C
    if prompted:
        front, attention = matching(s), _attention(tcpa(s.B, s.H, s.N, s.P, s.D))
    else:
        front = {"fwd": [layer_norm(M, C)], "bwd": [layer_norm(M, C, backward=True)]}
        attention = _attention(fa2(s.B, s.H, s.N, 0, s.D))
        attention["bwd"].append(Kernel(hbm_bytes=2 * 2 * 3 * M * C * BF16, launches=2))  # dq, dk, dv -> dqkv
    extra = {"prompt K/V (model / L)": prompt_kv(s), "reductions": reductions(s)} if prompted else {}
    return {"norm1 | matching": front, "attention": attention, **backbone(s, prompted), **extra}


def total(kernels: list[Kernel]) -> tuple[Kernel, float]:
    """(the kernels' summed work, their summed roofline seconds)."""
    summed = Kernel(**{k: sum(asdict(kn)[k] for kn in kernels) for k in asdict(Kernel())})
    return summed, sum(kn.seconds() for kn in kernels)


def layer_kernels(model: dict[str, Component], direction: str | None = None) -> list[Kernel]:
    """Every kernel of a layer model, of one direction or both."""
    return [k for c in model.values() for d, ks in c.items() if direction in (None, d) for k in ks]


def matching_tc_share(s: LayerShape) -> float:
    """TCPA's matching kernels' tensor-core FLOPs (fwd + bwd, padded) / the no-prompt layer's GEMM FLOPs."""
    match, gemms = layer(s, True)["norm1 | matching"], layer(s, False)["GEMMs"]
    flops = [sum(k.tc16 + k.tf32 for ks in c.values() for k in ks) for c in (match, gemms)]
    return flops[0] / flops[1]


def layer_report(label: str, s: LayerShape) -> str:
    """The table of one shape: per component and direction, both layers (one row where they are the same)."""
    models = {"no-prompt": layer(s, False), "TCPA": layer(s, True)}
    lines = [f"Whole layer, {label}: B={s.B} N={s.N} C={s.C} H={s.H} D={s.D}, pools {s.pool_cls}+{s.pool_img} "
             f"(P={s.P}), top-k {s.topk}, L={s.L}; x fp32, GEMMs bf16 (autocast), frozen backbone",
             f"{'component':23s} {'layer':9s} {'dir':3s} {'bf16 GF':>8s} {'TF32 GF':>8s} {'CUDA GF':>8s} "
             f"{'exp2 G':>7s} {'HBM MB':>8s} {'launch':>7s} {'us':>8s}"]
    for name in models["TCPA"]:
        for direction in ("fwd", "bwd"):
            rows = {side: total(m[name][direction]) for side, m in models.items() if name in m}
            if len(rows) == 2 and rows["TCPA"] == rows["no-prompt"]:
                rows = {"both": rows["TCPA"]}
            for side, (k, t) in rows.items():
                lines.append(f"{name:23s} {side:9s} {direction:3s} {k.tc16 / 1e9:8.2f} {k.tf32 / 1e9:8.2f} "
                             f"{k.cuda / 1e9:8.3f} {k.exp2 / 1e9:7.3f} {k.hbm_bytes / 1e6:8.1f} {k.launches:7.2f} "
                             f"{t * 1e6:8.1f}")
    times = {side: {d: total(layer_kernels(m, d))[1] for d in ("fwd", "bwd")} for side, m in models.items()}
    for side, t in times.items():
        lines.append(f"{'total':23s} {side:9s} fwd {t['fwd'] * 1e6:.1f} us, bwd {t['bwd'] * 1e6:.1f} us, "
                     f"step {(t['fwd'] + t['bwd']) * 1e6:.1f} us")
    ours, base = (sum(times[side].values()) for side in ("TCPA", "no-prompt"))
    lines.append(f"TCPA extra per layer (H100 SXM model, not a measurement): {(ours - base) * 1e6:+.1f} us "
                 f"(fwd {(times['TCPA']['fwd'] - times['no-prompt']['fwd']) * 1e6:+.1f}, bwd "
                 f"{(times['TCPA']['bwd'] - times['no-prompt']['bwd']) * 1e6:+.1f}); TCPA / no-prompt = "
                 f"{ours / base:.3f}; matching tensor-core FLOPs / no-prompt GEMM FLOPs = "
                 f"{100 * matching_tc_share(s):.2f}% (target <= 5%)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-sample", action="store_true", help="prompts per sample ([B, H, P, D]) instead of shared")
    parser.add_argument("--section", choices=("attention", "layer", "all"), default="all",
                        help="the attention kernels against FA2, the whole layer against the no-prompt layer, or both")
    args = parser.parse_args(argv)
    if args.section in ("attention", "all"):
        attention_report(args.per_sample)
    if args.section in ("layer", "all"):
        print(f"H100 SXM roofline model: bf16 {TC16_RATE / 1e12:.0f}, TF32 {TF32_RATE / 1e12:.0f}, fp32 CUDA core "
              f"{CUDA_RATE / 1e12:.0f} TFLOP/s, exp2 {EXP2_RATE / 1e12:.1f} T/s, HBM {HBM_RATE / 1e12:.2f} TB/s, "
              f"{LAUNCH_S * 1e6:.0f} us a launch")
        for label, shape in LAYER_SHAPES:
            print("\n" + layer_report(label, shape))


if __name__ == "__main__":
    main()
