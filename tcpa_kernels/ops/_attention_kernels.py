"""Triton kernels of prompt-augmented attention (docs/how-it-works.md, 'Attention' and 'Kernels').

Keys form ONE range of N + P keys, [tokens ; prompts], cut into BLOCK_N tiles: the N // BLOCK_N full token tiles
need no mask at all; only the tail tiles (the last N % BLOCK_N tokens, the prompts, padding past N + P) take
bounds masks and the selection (every token key, the selected prompts). So a ViT-B/16 layer (197 tokens, 36
prompts, 64-key tiles) runs 4 key tiles per query block, as FlashAttention does on 233 keys, and 3 of them are
plain. Tokens go first: every tile up to the first prompt-only tile holds a token, so the running max is finite
from the first tile on and no all-masked row needs a guard.

A prompt bank (``Selection.tasks``, HAS_TASKS): each batch entry reads its task's prompt set of ``[T, 2, H, P, D]``
in place (``_prompt_set``); with per-sample pool layouts (``Selection.layouts``, HAS_LAYOUTS, tasks whose pools
differ, padded) a tail tile's prompts outside the entry's own pools count as keys past N + P (``_live_prompts``).

Forward, one launch: one program per (batch*head, query block), on a 1-D grid with the query block fastest, so
the programs that read one head's K/V run side by side and share it through L2. Online softmax over the key
tiles. Every prompt score enters the running max and the normaliser; only selected prompts enter the
accumulator (renormalize=False); with renormalize=True unselected prompts get -inf. Saves lse (log2 units).

Backward, one launch: one program per (batch, head) (FlashAttention-2 recomputation) when those fill the GPU twice
over, else (small batches) each (batch, head)'s key tiles split over up to one program per tile (``key_splits``),
with
p = exp2(s*log2e - lse), dP = dO.v, delta = dO.O:
  ds = p * (m*dP - delta)     renormalize=False  (unselected prompts still get a key gradient)
  ds = m*p * (dP - delta)     renormalize=True
  dv = sum_rows (m*p) dO,  dq = scale * sum ds k,  dk = scale * sum_rows ds q      (m = 1 for tokens)
The program first computes delta for its N rows (fp32 scratch), then walks the key tiles; per tile it keeps
K/V and the dK/dV accumulators on chip and walks the query blocks: 5 MMAs per (query block, key tile), one exp2
per score, as FlashAttention-2's backward. Each query block's dq contribution (dS.K) is added to an fp32 scratch
row block of this program: the first key tile stores it, the last one writes dq itself (scaled, in dq's
dtype); split programs store each tile's contribution apart, and the last of a (batch, head)'s programs to finish
(an atomic ticket) writes dq as their sum in key-tile order, the additions one program would make: deterministic,
and the same bits. Race-free by construction: every row of DELTA, the dq scratch, dk and dv belongs to exactly one
program, dq to the one that writes it, and a barrier (``tl.debug_barrier``: __syncthreads, which also orders
global memory within the block) after the delta pass and after each key tile orders the program's own writes
before its later reads of them.
Prompt K/V shared by the batch ([H, P, D]) need a reduction over the batch: the kernel writes fp32 partials
that the caller sums (deterministic), or adds fp32 atomics into [H, P, D]. When the B*H programs would fill the
GPU more than twice over, each program walks a group of consecutive batch entries of one head (``batch_group``)
and adds their prompt gradients into one partial in batch order, so the partials the caller reads are that many
times fewer (ViT-B/16 at batch 128 on an H100: groups of 5, 312 programs).

Layouts: every [B, H, N, D] operand is addressed through its own (b, h, n) strides with unit stride on D: q/k/v
share one stride set, dq/dk/dv one, prompt K/V one ([H, P, D]: batch stride 0), prompt gradients one, o and do
one each. Each group also takes a shift: k lies ``kv_heads`` head strides after its pointer and v twice that
(likewise prompt V, ``pv_heads``, and dk/dv, ``dkv_heads``), so a group stored in one tensor (timm's fused qkv
[B, N, 3, H, D]: shift H; prompt K/V [.., 2, H, P, D]) is passed as that tensor once per pointer, no view made on
the host; separate tensors take shift 0. So timm's qkv is read in place, o is written as [B, N, H, D] (what the
output projection reads) and dq/dk/dv go straight into one [B, N, 3, H, D] buffer. The prompt gradients are
contiguous ([.., 2, H, P, D]: V's half H head strides after K's). Prompt K/V may be stored in another float dtype
than q (fp32 prompts with 16-bit q): they are cast to q's dtype after the load. lse ([B*H, N]) is contiguous fp32,
as is the backward's one scratch buffer: delta ([B*H*N], padded to 16 elements), then the dq accumulator
([B*H, N, D]). Offsets of the (batch, head) base are int64, offsets inside one (batch, head) int32.
"""

import functools

import torch
import triton
import triton.language as tl

from tcpa_kernels._backend import cdiv, next_power_of_2, refuse_interpreter_bf16, sm_count
from tcpa_kernels.ops._function import attention_grads, config_key
from tcpa_kernels.ops._launch import launch

LOG2E = 1.4426950408889634


@triton.jit
def _token_keys(K_BH, V_BH, stride_n, start_n, o_d, m_d, BLOCK_N: tl.constexpr):
    """k, v [BLOCK_N, D_PAD] of the full token tile start_n.. (no row mask: the tile is inside N)."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    p_rows = o_n[:, None] * stride_n + o_d[None, :]
    return tl.load(K_BH + p_rows, mask=m_d[None, :], other=0.0), tl.load(V_BH + p_rows, mask=m_d[None, :], other=0.0)


@triton.jit
def _tail_keys(K_BH, V_BH, PK_BH, PV_BH, stride_n, pstride_n, start_n, N, P, o_d, m_d, BLOCK_N: tl.constexpr):
    """Tail tile start_n.. of the key range [tokens ; prompts]: k, v [BLOCK_N, D_PAD] in the token dtype (the last
    tokens, then prompts, zeros past N + P); o_p (prompt index, 0 on token rows), is_token, is_prompt [BLOCK_N]."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    is_token = o_n < N
    o_p = tl.maximum(o_n - N, 0)
    is_prompt = (o_n >= N) & (o_p < P)
    p_tok = o_n[:, None] * stride_n + o_d[None, :]
    p_prm = o_p[:, None] * pstride_n + o_d[None, :]
    m_tok = is_token[:, None] & m_d[None, :]
    m_prm = is_prompt[:, None] & m_d[None, :]
    b_k = tl.where(is_token[:, None], tl.load(K_BH + p_tok, mask=m_tok, other=0.0),
                   tl.load(PK_BH + p_prm, mask=m_prm, other=0.0).to(K_BH.dtype.element_ty))
    b_v = tl.where(is_token[:, None], tl.load(V_BH + p_tok, mask=m_tok, other=0.0),
                   tl.load(PV_BH + p_prm, mask=m_prm, other=0.0).to(V_BH.dtype.element_ty))
    return b_k, b_v, o_p, is_token, is_prompt


@triton.jit
def _tail_selection(MASK, BITS, i_b, o_m, m_m, o_p, is_token, is_prompt, N, P, n_cls_prompts, pool_cls, len_cls,
                    len_img, MASK_MODE: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: may query row o_m (batch i_b) use the tail keys? Token keys always, prompts when
    selected, nothing past N + P."""
    if MASK_MODE == 0:  # explicit bool mask [B, N, P]
        p_mask = MASK + i_b * N * P + o_m[:, None].to(tl.int64) * P + o_p[None, :]
        picked = tl.load(p_mask, mask=m_m[:, None] & is_prompt[None, :], other=0) != 0
    else:  # selection words [B, N]: bit entry(p), tested in 32-bit halves (64-bit shifts cost several instructions)
        words = tl.load(BITS + i_b * N + o_m, mask=m_m, other=0)  # [BLOCK_M] int64
        low, high = words.to(tl.int32), (words >> 32).to(tl.int32)
        entry = tl.where(o_p < n_cls_prompts, o_p // len_cls, pool_cls + (o_p - n_cls_prompts) // len_img)  # [BN]
        half = tl.where(entry[None, :] < 32, low[:, None], high[:, None])  # [BLOCK_M, BLOCK_N] int32
        picked = (((half >> (entry & 31)[None, :]) & 1) != 0) & is_prompt[None, :]
    return is_token[None, :] | picked


@triton.jit
def _softmax_step(acc, m_i, l_i, b_s, b_v, valid, sel, TAIL: tl.constexpr, RENORMALIZE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Fold one key tile (scores b_s [BM, BN] in log2 units, values b_v [BN, D_PAD]) into the running output
    acc [BM, D_PAD], max m_i and sum l_i [BM]. Tail tiles: valid [BN] keys inside N + P, sel [BM, BN] (only
    selected prompts reach the output; unselected ones stay in the normaliser unless RENORMALIZE)."""
    if TAIL:
        if RENORMALIZE:
            b_s = tl.where(sel, b_s, float("-inf"))
        else:
            b_s = tl.where(valid[None, :], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    alpha = tl.exp2(m_i - m_new)
    b_p = tl.exp2(b_s - m_new[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if TAIL:
        if not RENORMALIZE:
            b_p = tl.where(sel, b_p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _live_prompts(LAYOUTS, i_b, o_p, is_prompt, n_cls_prompts, len_cls, len_img, HAS_LAYOUTS: tl.constexpr):
    """is_prompt [BLOCK_N] narrowed, with HAS_LAYOUTS, to the prompts batch entry i_b has: its own pools inside the
    padded ones (LAYOUTS int [B, 6]: of the CLS pool's entries of len_cls tokens, the first LAYOUTS[b, 0] entries'
    first LAYOUTS[b, 4] tokens; of the image pool's, the first LAYOUTS[b, 1] entries' first LAYOUTS[b, 5]). The
    others are treated as keys past N + P: in neither the normaliser nor the output, zero gradients."""
    live = is_prompt
    if HAS_LAYOUTS:  # resolved at compile time: one return type
        p_row = LAYOUTS + i_b * 6
        is_cls = o_p < n_cls_prompts
        o_q = tl.where(is_cls, o_p, o_p - n_cls_prompts)  # the prompt's index in its pool
        length = tl.where(is_cls, len_cls, len_img)
        own_entries = tl.where(is_cls, tl.load(p_row).to(tl.int32), tl.load(p_row + 1).to(tl.int32))
        own_length = tl.where(is_cls, tl.load(p_row + 4).to(tl.int32), tl.load(p_row + 5).to(tl.int32))
        live = is_prompt & (o_q // length < own_entries) & (o_q % length < own_length)
    return live


@triton.jit
def _prompt_set(TASKS, i_b, HAS_TASKS: tl.constexpr):
    """The row of the prompt K/V that batch entry i_b reads (int64): its own (per-sample prompts; 0 with batch
    stride 0 for shared ones), or with HAS_TASKS its task's prompt set of a bank, TASKS[i_b] (int [B])."""
    if HAS_TASKS:
        return tl.load(TASKS + i_b).to(tl.int64)
    return i_b


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, MASK, BITS, TASKS, LAYOUTS, O, LSE,
                stride_b, stride_h, stride_n, kv_heads, pstride_b, pstride_h, pstride_n, pv_heads,
                ostride_b, ostride_h, ostride_n, H, N, P, D, qk_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_TASKS: tl.constexpr,
                HAS_LAYOUTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                PRECISION: tl.constexpr):
    n_query_blocks = tl.cdiv(N, BLOCK_M)
    i_bh = (tl.program_id(0) // n_query_blocks).to(tl.int64)  # query block fastest: one head's programs adjacent
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = (tl.program_id(0) % n_query_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    K_BH = K + i_b * stride_b + (i_h + kv_heads) * stride_h
    V_BH = V + i_b * stride_b + (i_h + 2 * kv_heads) * stride_h
    i_pb = _prompt_set(TASKS, i_b, HAS_TASKS)
    PK_BH = PK + i_pb * pstride_b + i_h * pstride_h
    PV_BH = PV + i_pb * pstride_b + (i_h + pv_heads) * pstride_h
    b_q = tl.load(Q + i_b * stride_b + i_h * stride_h + o_m[:, None] * stride_n + o_d[None, :], mask=m_md,
                  other=0.0)  # [BM, D_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        b_k, b_v = _token_keys(K_BH, V_BH, stride_n, start_n, o_d, m_d, BLOCK_N)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, b_s, b_v, None, None, False, RENORMALIZE, PRECISION)
    for start_n in range(n_full, N + P, BLOCK_N):
        b_k, b_v, o_p, is_token, is_prompt = _tail_keys(K_BH, V_BH, PK_BH, PV_BH, stride_n, pstride_n, start_n, N,
                                                        P, o_d, m_d, BLOCK_N)
        is_prompt = _live_prompts(LAYOUTS, i_b, o_p, is_prompt, n_cls_prompts, len_cls, len_img, HAS_LAYOUTS)
        sel = _tail_selection(MASK, BITS, i_b, o_m, m_m, o_p, is_token, is_prompt, N, P, n_cls_prompts, pool_cls,
                              len_cls, len_img, MASK_MODE)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, b_s, b_v, is_token | is_prompt, sel, True, RENORMALIZE,
                                      PRECISION)
    b_o = acc / l_i[:, None]  # [BM, D_PAD]
    p_out = O + i_b * ostride_b + i_h * ostride_h + o_m[:, None] * ostride_n + o_d[None, :]
    tl.store(p_out, b_o.to(O.dtype.element_ty), mask=m_md)
    tl.store(LSE + i_bh * N + o_m, m_i + tl.log2(l_i), mask=m_m)


@triton.jit
def _bwd_key_tile(b_k, b_v, start_n, last_start, Q_BH, DO_BH, LSE_BH, DELTA_BH, DQ_ACC_BH, DQ_BH,
                  stride_n, dostride_n, dstride_n, MASK, BITS, i_b, o_p, is_token, is_prompt,
                  N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img,
                  TAIL: tl.constexpr, MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
                  SPLIT: tl.constexpr):
    """dK, dV [BLOCK_N, D_PAD] (fp32, unscaled dK) of key tile start_n.. (k, v on chip) over every query block;
    adds each block's dq contribution to its fp32 scratch rows, or writes dq when start_n is the last tile
    (last_start); SPLIT: stores it in this tile's own scratch rows ([tiles, N, D] from DQ_ACC_BH)."""
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    b_dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(Q_BH + o_m[:, None] * stride_n + o_d[None, :], mask=m_md, other=0.0)  # [BM, D_PAD]
        b_do = tl.load(DO_BH + o_m[:, None] * dostride_n + o_d[None, :], mask=m_md, other=0.0)
        b_lse = tl.load(LSE_BH + o_m, mask=m_m, other=float("inf"))  # [BM]; rows past N get p = 0
        b_delta = tl.load(DELTA_BH + o_m, mask=m_m, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        if TAIL:
            b_s = tl.where((is_token | is_prompt)[None, :], b_s, float("-inf"))
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_pv = b_p  # the probabilities that weight the values
        if TAIL:
            sel = _tail_selection(MASK, BITS, i_b, o_m, m_m, o_p, is_token, is_prompt, N, P, n_cls_prompts,
                                  pool_cls, len_cls, len_img, MASK_MODE)
            b_pv = tl.where(sel, b_p, 0.0)
        b_dv += tl.dot(tl.trans(b_pv.to(b_do.dtype)), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BM, BN]
        if TAIL:
            if RENORMALIZE:
                b_ds = b_pv * (b_dp - b_delta[:, None])
            else:
                b_ds = b_p * (tl.where(sel, b_dp, 0.0) - b_delta[:, None])
        else:
            b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)  # [BM, D_PAD]
        p_acc = DQ_ACC_BH + o_m[:, None] * D + o_d[None, :]
        if SPLIT:
            tl.store(p_acc + (start_n // BLOCK_N) * N * D, b_dq, mask=m_md)
        else:
            if start_n > 0:
                b_dq += tl.load(p_acc, mask=m_md, other=0.0)
            if start_n == last_start:
                tl.store(DQ_BH + o_m[:, None] * dstride_n + o_d[None, :],
                         (b_dq * sm_scale).to(DQ_BH.dtype.element_ty), mask=m_md)
            else:
                tl.store(p_acc, b_dq, mask=m_md)
    return b_dk, b_dv


@triton.jit
def _bwd_kernel(Q, K, V, PK, PV, MASK, BITS, TASKS, LAYOUTS, O, DO, LSE, DQ, DK, DV, DPK, DELTA, COUNTER,
                stride_b, stride_h, stride_n, kv_heads, pstride_b, pstride_h, pstride_n, pv_heads,
                ostride_b, ostride_h, ostride_n, dostride_b, dostride_h, dostride_n,
                dstride_b, dstride_h, dstride_n, dkv_heads, dpstride_b, dpstride_h, dpstride_n,
                B, H, N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls, len_cls, len_img, n_splits, batch_group,
                MASK_MODE: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_TASKS: tl.constexpr,
                HAS_LAYOUTS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D_PAD: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, GROUPED: tl.constexpr):
    """The gradients of one head for one batch entry or (GROUPED) ``batch_group`` consecutive ones, one after the
    other, or (SPLIT) of
    one (batch, head) from a contiguous range of its key tiles, ``n_splits`` programs sharing them: dq, dk, dv, and
    the prompt gradients into DPK (fp32 [.., 2, H, P, D], the V half H * dpstride_h elements after the K half:
    per-sample gradients (with TASKS too: the caller sums them per prompt set), or partials of prompts shared by
    the batch, one per (batch group, head), summed over the group in batch order, or with ATOMIC atomics at batch
    stride 0). DELTA is the fp32 scratch: delta
    [programs * N] (padded to a multiple of 16 elements), then the dq accumulator [programs, N, D] (present only
    with several key tiles; SPLIT: one per key tile, [B*H, tiles, N, D]). With SPLIT the last of a (batch, head)'s
    programs to finish (an int32 ticket per (batch, head) in COUNTER, zeroed by the caller) writes dq as the sum of
    the tiles' accumulators in tile order: the additions one program makes, so the same bits whichever finishes
    last."""
    pid = tl.program_id(0).to(tl.int64)
    if SPLIT:  # pid = (batch * H + head) * n_splits + split: one head's programs adjacent
        i_bh = pid // n_splits
        i_split = tl.program_id(0) % n_splits  # int32: the key offsets stay 32-bit, as without splits
        n_tiles = tl.cdiv(N + P, BLOCK_N)
        first_start = (i_split * n_tiles // n_splits) * BLOCK_N  # this program's key tiles: first_start..end_n
        end_n = tl.minimum(((i_split + 1) * n_tiles // n_splits) * BLOCK_N, N + P)
        b_first = i_bh // H
        b_end = b_first + 1
        i_h = i_bh % H
    else:  # pid = batch group * H + head
        first_start = 0
        end_n = N + P
        b_first = (tl.program_id(0) // H) * batch_group  # int32, as the loop over the group's entries
        if GROUPED:
            b_end = tl.minimum(b_first + batch_group, B)
        else:  # one trip: as a constant trip count, the loop costs no registers
            b_end = b_first + 1
        i_h = tl.program_id(0) % H
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    DELTA_BH = DELTA + pid * N  # this program's scratch rows, reused by each batch entry of its group
    DQ_ACC = DELTA + tl.cdiv(tl.num_programs(0).to(tl.int64) * N, 16) * 16
    if SPLIT:  # [B*H, tiles, N, D]: one accumulator per key tile
        DQ_ACC_BH = DQ_ACC + (b_first * H + i_h) * tl.cdiv(N + P, BLOCK_N) * N * D
    else:  # [programs, N, D]
        DQ_ACC_BH = DQ_ACC + pid * N * D
    last_start = ((end_n - 1) // BLOCK_N) * BLOCK_N
    n_full = (N // BLOCK_N) * BLOCK_N
    for i_entry in range(b_first, b_end):
        i_b = tl.cast(i_entry, tl.int64)
        Q_BH = Q + i_b * stride_b + i_h * stride_h
        K_BH = K + i_b * stride_b + (i_h + kv_heads) * stride_h
        V_BH = V + i_b * stride_b + (i_h + 2 * kv_heads) * stride_h
        DQ_BH = DQ + i_b * dstride_b + i_h * dstride_h
        DK_BH = DK + i_b * dstride_b + (i_h + dkv_heads) * dstride_h
        DV_BH = DV + i_b * dstride_b + (i_h + 2 * dkv_heads) * dstride_h
        DO_BH = DO + i_b * dostride_b + i_h * dostride_h
        LSE_BH = LSE + (i_b * H + i_h) * N
        # delta = rowsum(dO * O) of every row, once
        for start_m in range(0, N, BLOCK_M):
            o_m = start_m + tl.arange(0, BLOCK_M)
            m_md = (o_m < N)[:, None] & m_d[None, :]
            b_do = tl.load(DO_BH + o_m[:, None] * dostride_n + o_d[None, :], mask=m_md, other=0.0)
            b_o = tl.load(O + i_b * ostride_b + i_h * ostride_h + o_m[:, None] * ostride_n + o_d[None, :],
                          mask=m_md, other=0.0)
            tl.store(DELTA_BH + o_m, tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1), mask=o_m < N)
        tl.debug_barrier()

        for start_n in range(first_start, tl.minimum(end_n, n_full), BLOCK_N):
            b_k, b_v = _token_keys(K_BH, V_BH, stride_n, start_n, o_d, m_d, BLOCK_N)
            b_dk, b_dv = _bwd_key_tile(b_k, b_v, start_n, last_start, Q_BH, DO_BH, LSE_BH, DELTA_BH,
                                       DQ_ACC_BH, DQ_BH, stride_n, dostride_n, dstride_n, MASK, BITS,
                                       i_b, None, None, None, N, P, D, qk_scale, sm_scale, n_cls_prompts, pool_cls,
                                       len_cls, len_img, False, MASK_MODE, RENORMALIZE, BLOCK_M, BLOCK_N, D_PAD,
                                       PRECISION, SPLIT)
            p_rows = (start_n + tl.arange(0, BLOCK_N))[:, None] * dstride_n + o_d[None, :]
            tl.store(DK_BH + p_rows, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_d[None, :])
            tl.store(DV_BH + p_rows, b_dv.to(DV.dtype.element_ty), mask=m_d[None, :])
            tl.debug_barrier()  # this tile's dq scratch writes before the next tile reads them

        i_pb = _prompt_set(TASKS, i_b, HAS_TASKS)
        PK_BH = PK + i_pb * pstride_b + i_h * pstride_h
        PV_BH = PV + i_pb * pstride_b + (i_h + pv_heads) * pstride_h
        i_partial = tl.cast(b_first // batch_group, tl.int64)  # the entry's own gradient, or its group's partial
        DPK_BH = DPK + i_partial * dpstride_b + i_h * dpstride_h
        DPV_BH = DPK + i_partial * dpstride_b + (i_h + H) * dpstride_h
        for start_n in range(tl.maximum(first_start, n_full), end_n, BLOCK_N):
            b_k, b_v, o_p, is_token, is_prompt = _tail_keys(K_BH, V_BH, PK_BH, PV_BH, stride_n, pstride_n, start_n,
                                                            N, P, o_d, m_d, BLOCK_N)
            is_live = _live_prompts(LAYOUTS, i_b, o_p, is_prompt, n_cls_prompts, len_cls, len_img, HAS_LAYOUTS)
            b_dk, b_dv = _bwd_key_tile(b_k, b_v, start_n, last_start, Q_BH, DO_BH, LSE_BH, DELTA_BH,
                                       DQ_ACC_BH, DQ_BH, stride_n, dostride_n, dstride_n, MASK, BITS,
                                       i_b, o_p, is_token, is_live, N, P, D, qk_scale, sm_scale, n_cls_prompts,
                                       pool_cls, len_cls, len_img, True, MASK_MODE, RENORMALIZE, BLOCK_M,
                                       BLOCK_N, D_PAD, PRECISION, SPLIT)
            b_dk = b_dk * sm_scale
            o_n = start_n + tl.arange(0, BLOCK_N)
            p_tok = o_n[:, None] * dstride_n + o_d[None, :]
            m_tok = is_token[:, None] & m_d[None, :]
            tl.store(DK_BH + p_tok, b_dk.to(DK.dtype.element_ty), mask=m_tok)
            tl.store(DV_BH + p_tok, b_dv.to(DV.dtype.element_ty), mask=m_tok)
            p_prm = o_p[:, None] * dpstride_n + o_d[None, :]
            m_prm = is_prompt[:, None] & m_d[None, :]  # a sample's prompts it does not have: zeros
            if ATOMIC:
                tl.atomic_add(DPK_BH + p_prm, b_dk, mask=m_prm)
                tl.atomic_add(DPV_BH + p_prm, b_dv, mask=m_prm)
            else:
                if i_entry > b_first:  # a later entry of the group: add to the group's partial
                    b_dk += tl.load(DPK_BH + p_prm, mask=m_prm, other=0.0)
                    b_dv += tl.load(DPV_BH + p_prm, mask=m_prm, other=0.0)
                tl.store(DPK_BH + p_prm, b_dk.to(DPK.dtype.element_ty), mask=m_prm)
                tl.store(DPV_BH + p_prm, b_dv.to(DPK.dtype.element_ty), mask=m_prm)
            tl.debug_barrier()
    if SPLIT:
        _reduce_split_dq(COUNTER, DELTA, DQ, dstride_b, dstride_h, dstride_n, H, N, P, D, sm_scale, n_splits,
                         BLOCK_M, BLOCK_N, D_PAD)


@triton.jit
def _reduce_split_dq(COUNTER, DELTA, DQ, dstride_b, dstride_h, dstride_n, H, N, P, D, sm_scale, n_splits,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """The last of a (batch, head)'s split programs to arrive writes its dq: the sum of the key tiles' fp32
    accumulators ([tiles, N, D] in the scratch after delta) in tile order. The barrier before the ticket (acq_rel,
    GPU scope) orders every thread's accumulator stores before it; the last program reads the others' through L2
    (.cg). Its pointers are recomputed here from the program id, not kept live through the key tiles."""
    tl.debug_barrier()
    i_bh = tl.program_id(0).to(tl.int64) // n_splits
    ticket = tl.atomic_add(COUNTER + i_bh, 1, sem="acq_rel", scope="gpu")
    if ticket == n_splits - 1:
        n_tiles = tl.cdiv(N + P, BLOCK_N)
        DQ_ACC_BH = DELTA + tl.cdiv(tl.num_programs(0).to(tl.int64) * N, 16) * 16 + i_bh * n_tiles * N * D
        DQ_BH = DQ + (i_bh // H) * dstride_b + (i_bh % H) * dstride_h
        o_d = tl.arange(0, D_PAD)
        for start_m in range(0, N, BLOCK_M):
            o_m = start_m + tl.arange(0, BLOCK_M)
            m_md = (o_m < N)[:, None] & (o_d < D)[None, :]
            b_dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
            for i_tile in range(0, n_tiles):
                p_acc = DQ_ACC_BH + i_tile * N * D + o_m[:, None] * D + o_d[None, :]
                b_dq += tl.load(p_acc, mask=m_md, other=0.0, cache_modifier=".cg")
            tl.store(DQ_BH + o_m[:, None] * dstride_n + o_d[None, :], (b_dq * sm_scale).to(DQ_BH.dtype.element_ty),
                     mask=m_md)


# ----------------------------------------------------------------------------------------------
# launchers: one kernel launch each. Tensors come in the layouts the kernels take (see the module docstring); their
# callers (the kernel ops and autograd Functions of _function.py and packed.py) allocate the gradient buffers and do
# the aten work around the launches.


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, by operand class and padded head dim (64 stands for
# 16..64). BLOCK_N is the key tile, BLOCK_M the query block (the backward keeps a key tile's dK/dV on chip and
# streams query blocks past it). Chosen offline from the sm_90 compile report (`python benchmarks/tune.py
# --offline`, docs/sm90-resources.md): the largest tiles that ptxas fits in registers without spilling, with fp32
# prompt K/V (what the model passes). The one-pass backward holds dK, dV, S, dP, dS and the dq partial at once:
# 64x64 tiles spilled, 32x64 (8 warps) is the largest that did not at both head dims. fp32 operands run 3xTF32
# dots (tensor cores, fp32-level accuracy): exact fp32 dots on CUDA cores spilled in the backward at every tile
# down to 16x16. Not yet timed on a GPU: `benchmarks/tune.py` times the alternatives there.
LAUNCH_CONFIGS = {
    ("16-bit", 64): {"fwd": (64, 64, 4, 3), "bwd": (32, 64, 8, 2)},
    ("16-bit", 128): {"fwd": (64, 32, 8, 3), "bwd": (32, 64, 8, 2)},
    ("fp32", 64): {"fwd": (32, 32, 4, 1), "bwd": (16, 32, 4, 1)},
    ("fp32", 128): {"fwd": (16, 16, 4, 1), "bwd": (16, 16, 8, 1)},
}
# dot precision by operand dtype: 3xTF32 for fp32 (three tensor-core products per dot, error near fp32's)
DOT_PRECISION = {"fp32": "tf32x3", "16-bit": "tf32"}


def _table_entry(kernel, D, dtype):
    """(LAUNCH_CONFIGS entry of ``kernel`` ('fwd' | 'bwd'), operand class) at head dim D."""
    operand, d_pad = config_key(D, dtype)
    configs = LAUNCH_CONFIGS.get((operand, d_pad))
    if configs is None:
        raise ValueError(f"head dim D={D}: the Triton kernels take D <= 128; use backend='torch'")
    return configs[kernel], operand


def launch_config(kernel, N, P, D, dtype, **flags):
    """Constexprs and launch options of ``kernel`` ('fwd' | 'bwd') for N tokens and P prompts of head dim D (and the
    kernel's flag constexprs, ``flags``): a cached dict, not to be changed. Query blocks shrink to N, key tiles to
    N + P (at least 16, the smallest tl.dot)."""
    return _launch_config(*_table_entry(kernel, D, dtype), N, P, D, tuple(flags.items()))


@functools.cache
def _launch_config(entry, operand, N, P, D, flags):
    block_m, block_n, num_warps, num_stages = entry
    return dict(BLOCK_M=min(block_m, max(16, next_power_of_2(N))),
                BLOCK_N=min(block_n, max(16, next_power_of_2(N + P))), D_PAD=max(16, next_power_of_2(D)),
                PRECISION=DOT_PRECISION[operand], num_warps=num_warps, num_stages=num_stages, **dict(flags))


# Launch plans: (grid, the scalar arguments, constexprs and launch options, buffer shapes) of one launch, computed
# once per layout, dtype, shape, strides, selection layout and flags (never from a tensor's values), from the
# tensors' own shapes and strides (no view is made to read them) and LAUNCH_CONFIGS as it is then: who edits the
# table at run time calls forget_plans() (benchmarks/tune.py). Each operand group (q/k/v, prompt K/V, dq/dk/dv)
# is passed to the kernels as its pointers and (b, h, n, shift): the (batch, head, row) strides of its [B, H, N, D]
# tensors (batch stride 0 for prompts shared by the batch) and how many head strides after its pointer the second
# tensor of the group lies (the third: twice that). Separate tensors: shift 0. A packed group (qkv [B, N, 3, H, D],
# prompt_kv [.., 2, H, P, D]) is one tensor passed once per pointer, its slices ``shift`` head strides apart.


def _stacked(b, h, n, step, H):
    """(b, h, n, shift) of slices stacked ``step`` elements apart, read through one pointer (the callers guarantee
    that step is a whole number of head strides h, ``_function.read_in_place``; with one head any head stride
    serves: it only ever multiplies head 0)."""
    if H == 1:
        return b, step, n, 1
    if h == 0 or step % h:
        raise ValueError(f"stacked operands {step} elements apart, not a whole number of head strides ({h})")
    return b, h, n, step // h


def _geometry(packed, stacked, shape, strides, prompt_shape, prompt_strides):
    """(dims (B, H, N, P, D), q/k/v strides, prompt K/V strides) of q [B, H, N, D] or (``packed``) qkv
    [B, N, 3, H, D], and of prompt_k [H, P, D] or [B, H, P, D] or (``stacked``) prompt_kv [2, H, P, D] or
    [B, 2, H, P, D]."""
    if packed:
        B, N, _, H, D = shape
        qkv = _stacked(strides[0], strides[3], strides[1], strides[2], H)
    else:
        B, H, N, D = shape
        qkv = (*strides[:3], 0)
    ps = prompt_strides
    if stacked:
        pb, pstep, ph, pn = (0, *ps[:3]) if len(ps) == 4 else ps[:4]
        prompts = _stacked(pb, ph, pn, pstep, H)
    else:
        prompts = ((0, *ps[:2]) if len(ps) == 3 else ps[:3]) + (0,)
    return (B, H, N, prompt_shape[-2], D), qkv, prompts


def _selection_scalars(mask_mode, has_layouts, layout):
    """The kernels' (n_cls_prompts, pool_cls, len_cls, len_img) of a selection's (pool_cls, len_cls, len_img) (unused
    by a bool mask without layouts)."""
    pool_cls, len_cls, len_img = layout
    return (pool_cls * len_cls, pool_cls, len_cls, len_img) if mask_mode or has_layouts else (0, 0, 1, 1)


@functools.cache
def _forward_plan(packed, stacked, dtype, shape, strides, prompt_shape, prompt_strides, mask_mode, has_tasks,
                  has_layouts, layout, scale, renormalize):
    """``_fwd_kernel``, writing out as a contiguous [B, N, H, D] buffer: (grid, scalars, meta, out shape ([B, N, H*D]
    packed, else [B, N, H, D]), lse shape)."""
    (B, H, N, P, D), qkv, prompts = _geometry(packed, stacked, shape, strides, prompt_shape, prompt_strides)
    meta = _launch_config(*_table_entry("fwd", D, dtype), N, P, D,
                          (("MASK_MODE", mask_mode), ("RENORMALIZE", renormalize), ("HAS_TASKS", has_tasks),
                           ("HAS_LAYOUTS", has_layouts)))
    scalars = (*qkv, *prompts, N * H * D, D, H * D, H, N, P, D, scale * LOG2E,
               *_selection_scalars(mask_mode, has_layouts, layout))
    out_shape = (B, N, H * D) if packed else (B, N, H, D)
    return (B * H * cdiv(N, meta["BLOCK_M"]),), scalars, meta, out_shape, (B, H, N)


@functools.cache
def _backward_plan(packed, stacked, dtype, shape, strides, prompt_shape, prompt_strides, out_strides,
                   grad_out_strides, grad_strides, mask_mode, has_tasks, has_layouts, layout, scale, renormalize,
                   atomic, prompt_groups, sms):
    """``_bwd_kernel`` with contiguous prompt gradients ([2, H, P, D] with ``atomic``, else ``prompt_groups``
    partials or per-sample gradients, [prompt_groups, 2, H, P, D]): (grid, scalars, meta, elements of the fp32
    scratch: delta [programs * N] padded to a multiple of 16, then the dq accumulators when there are several key
    tiles, the tickets of split programs (0: none)). out, grad_out and dq/dk/dv in q's layout: [B, N, H*D] and
    [B, N, 3, H, D] packed, else [B, H, N, D] each. Programs: one per head and group of batch entries (the entries
    sharing a prompt-gradient partial; per-sample gradients: groups of one), or ``key_splits`` per (batch, head)."""
    (B, H, N, P, D), qkv, prompts = _geometry(packed, stacked, shape, strides, prompt_shape, prompt_strides)
    entry = _table_entry("bwd", D, dtype)
    group = cdiv(B, prompt_groups) if prompt_groups else 1  # shared prompts' partials: one per group of entries
    tiles = cdiv(N + P, _launch_config(*entry, N, P, D, ())["BLOCK_N"])  # key tiles (BLOCK_N takes no flag)
    splits = 1 if (config_key(D, dtype)[1], mask_mode) in UNSPLIT_BACKWARD else key_splits(B * H, tiles, sms)
    meta = _launch_config(*entry, N, P, D, (("MASK_MODE", mask_mode), ("RENORMALIZE", renormalize),
                                            ("HAS_TASKS", has_tasks), ("HAS_LAYOUTS", has_layouts), ("ATOMIC", atomic),
                                            ("SPLIT", splits > 1), ("GROUPED", group > 1)))
    if packed:
        os, gs, ds = out_strides, grad_out_strides, grad_strides
        outs, grad_outs, grads = (os[0], D, os[1]), (gs[0], D, gs[1]), _stacked(ds[0], ds[3], ds[1], ds[2], H)
    else:
        outs, grad_outs, grads = out_strides[:3], grad_out_strides[:3], (*grad_strides[:3], 0)
    dprompts = (0 if atomic else 2 * H * P * D, P * D, D)
    scalars = (*qkv, *prompts, *outs, *grad_outs, *grads, *dprompts, B, H, N, P, D, scale * LOG2E, scale,
               *_selection_scalars(mask_mode, has_layouts, layout), splits, group)
    programs = B * H * splits if splits > 1 else cdiv(B, group) * H
    accumulators = (B * H * tiles if splits > 1 else programs) * N * D if tiles > 1 else 0  # dq's fp32 accumulators
    scratch = cdiv(programs * N, 16) * 16 + accumulators
    return (programs,), scalars, meta, scratch, B * H if splits > 1 else 0


# (padded head dim, mask mode) whose split backward spills registers on sm_90 (the full compile matrix: the explicit
# bool mask at head dims 65-128): those keep one program per (batch, head)
UNSPLIT_BACKWARD = {(128, 0)}


def key_splits(heads, tiles, sms):
    """Programs per (batch, head) of the backward: 1 when the B*H (``heads``) programs fill the GPU at least twice
    over (``sms`` SMs; off CUDA, None: always 1), else the fewest splits of the ``tiles`` key tiles that do (at most
    one tile per program): FlashAttention-2 also parallelises its backward over key blocks."""
    if sms is None or heads >= 2 * sms:
        return 1
    return min(tiles, cdiv(2 * sms, heads))


def forget_plans():
    """Drop the cached launch plans (after an edit of LAUNCH_CONFIGS)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def _selection_pointer(mask, bits):
    """The kernels' MASK and BITS argument (the unused one is a placeholder): a bool mask [B, N, P] read as uint8, or
    the selection words."""
    return bits if mask is None else mask.contiguous().view(torch.uint8)


def _forward(packed, stacked, q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, layout, scale, renormalize):
    """One launch of ``_fwd_kernel`` (operands as ``_geometry`` takes them, the pointers of a packed group its one
    tensor; tasks int [B] or None; layouts int [B, 6] or None; layout (pool_cls, len_cls, len_img)): (out, lse).
    Its dots run in q's dtype: bf16 is refused off CUDA (the interpreter); no launch without programs (a zero-size
    dimension), as in
    ``_backward``."""
    grid, scalars, meta, out_shape, lse_shape = _forward_plan(
        packed, stacked, q.dtype, q.shape, q.stride(), prompt_k.shape, prompt_k.stride(), 1 if mask is None else 0,
        tasks is not None, layouts is not None, layout, scale, renormalize)
    device = q.device
    out = torch.empty(out_shape, dtype=q.dtype, device=device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=device)
    refuse_interpreter_bf16("q", q)
    if grid[0]:
        selection = _selection_pointer(mask, bits)
        launch(_fwd_kernel, grid, (q, k, v, prompt_k, prompt_v, selection, selection, tasks, layouts), (out, lse),
               scalars, meta)
    return out, lse


def _backward(packed, stacked, dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits,
              tasks, layouts, layout, scale, renormalize):
    """One launch of ``_bwd_kernel`` (operands as ``_backward_plan`` takes them): with several programs per
    (batch, head), their zeroed tickets too."""
    device = q.device
    grid, scalars, meta, scratch, tickets = _backward_plan(
        packed, stacked, q.dtype, q.shape, q.stride(), prompt_k.shape, prompt_k.stride(), out.stride(),
        grad_out.stride(), dq.stride(), 1 if mask is None else 0, tasks is not None, layouts is not None, layout,
        scale, renormalize, dprompt.dim() == 4, dprompt.shape[0] if dprompt.dim() == 5 else 0, sm_count(device))
    scratch = torch.empty(scratch, dtype=torch.float32, device=device)
    tickets = torch.zeros(tickets, dtype=torch.int32, device=device) if tickets else None
    refuse_interpreter_bf16("q", q)
    if grid[0]:
        selection = _selection_pointer(mask, bits)
        launch(_bwd_kernel, grid, (q, k, v, prompt_k, prompt_v, selection, selection, tasks, layouts, out, grad_out,
                                   lse, dq, dk, dv, dprompt), (scratch, tickets), scalars, meta)


def attention_forward(q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                      renormalize):
    """One launch of ``_fwd_kernel``. q/k/v [B, H, N, D] share (b, h, n) strides with unit stride on D (the callers
    see to it: ``shared_strides``); prompt_k/prompt_v ([H, P, D] or [B, H, P, D], with tasks a bank's [T, H, P, D];
    q's dtype or fp32) likewise, or prompt_v None and prompt_k both stacked ([2, H, P, D] or [B, 2, H, P, D], with
    tasks [T, 2, H, P, D]; ``read_in_place``); the selection as ``Selection.op_args()``. Returns (out [B, H, N, D]
    in q's dtype: a transposed view of a contiguous [B, N, H, D] buffer; lse [B, H, N] fp32 in log2 units)."""
    stacked = prompt_v is None
    out, lse = _forward(False, stacked, q, k, v, prompt_k, prompt_k if stacked else prompt_v, mask, bits, tasks,
                        layouts, (pool_cls, len_cls, len_img), scale, renormalize)
    return out.transpose(1, 2), lse


def attention_backward(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits, tasks,
                       layouts, pool_cls, len_cls, len_img, scale, renormalize):
    """One launch of ``_bwd_kernel``: writes dq, dk, dv ([B, H, N, D] sharing one (b, h, n) stride set with unit
    stride on D) and the prompt gradients into dprompt (fp32, contiguous): [B, 2, H, P, D] (per-sample gradients, or
    per-(b, h) partials of prompts shared by the batch, which the caller sums, as it sums per-sample gradients
    per prompt set of a bank), or [2, H, P, D] zero-filled, to which
    the kernel adds with atomics. The other tensors as in ``attention_forward``; grad_out and out are read through
    their own strides (unit stride on D)."""
    stacked = prompt_v is None
    _backward(False, stacked, dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_k if stacked else prompt_v,
              out, lse, mask, bits, tasks, layouts, (pool_cls, len_cls, len_img), scale, renormalize)


def packed_forward(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize):
    """``attention_forward`` on qkv [B, N, 3, H, D] and stacked prompt_kv, both read in place (``read_in_place``):
    returns (out [B, N, H*D] contiguous, lse [B, H, N])."""
    return _forward(True, True, qkv, qkv, qkv, prompt_kv, prompt_kv, mask, bits, tasks, layouts,
                    (pool_cls, len_cls, len_img), scale, renormalize)


def packed_backward(dqkv, dprompt, grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks, layouts, pool_cls, len_cls,
                    len_img, scale, renormalize):
    """``attention_backward`` on the packed layouts: qkv and prompt_kv as in ``packed_forward``, out and grad_out
    [B, N, H*D] (unit stride on the last dim); writes dq, dk, dv into dqkv [B, N, 3, H, D] (``read_in_place``) and
    the prompt gradients into dprompt as ``attention_backward`` does."""
    _backward(True, True, dqkv, dqkv, dqkv, dprompt, grad_out, qkv, qkv, qkv, prompt_kv, prompt_kv, out, lse, mask,
              bits, tasks, layouts, (pool_cls, len_cls, len_img), scale, renormalize)


def backward_grads(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize, deterministic,
                   needs_grad):
    """The whole Triton backward outside autograd (benchmarks/tune.py times it): grads of (q, k, v, prompt_k,
    prompt_v), None where needs_grad is False; ``selection`` a Selection."""
    dq, dk, dv, dprompt = attention_grads(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection.op_args(), scale,
                                          renormalize, "triton", deterministic)
    return [g if need else None for g, need in zip((dq, dk, dv, *dprompt.unbind(-4)), needs_grad)]
