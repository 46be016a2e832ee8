"""PyTorch backend of prompt-augmented attention: the kernels' math, chunked over query tokens.

Used for CPU tensors (backend="auto") and as backend="torch" anywhere. Same functions as the Triton launchers
(forward; backward: dq, dk, dv and the prompt gradients; both again on timm's packed qkv layout), with the same
layouts, so the custom ops serve both backends. Forward saves only lse; the backward recomputes probabilities
chunk by chunk, so memory stays O(B*H*chunk*(N+P)) instead of O(B*H*N*(N+P)). Works in float64 too (the kernels do
not). Always deterministic.
"""

import functools

import torch

from tcpa_kernels._backend import autocast_off
from tcpa_kernels.ops.selection import Selection

CHUNK_ELEMENTS = 1 << 24  # scores per chunk: 64 MB in fp32


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operands(k, v, prompt_k, prompt_v, tasks, cd):
    """k, v [B, H, N, D] and prompt K/V as [B|1, H, P, D], in the compute dtype (prompt_v None: prompt_k stacks
    both on dim -4; tasks: each sample's prompt set of a bank [T, H, P, D], gathered, as a reference backend may)."""
    if prompt_v is None:
        prompt_k, prompt_v = prompt_k.unbind(-4)
    prompts4 = lambda t: (t if t.dim() == 4 else t.unsqueeze(0)) if tasks is None else t[tasks.long()]
    return k.to(cd), v.to(cd), prompts4(prompt_k).to(cd), prompts4(prompt_v).to(cd)


def _autocast_off(launcher):
    """The launcher with autocast off: it computes in its compute dtype whatever autocast the caller runs under (an
    eager call of the ops runs inside the caller's autocast, a compiled graph's op call not), as the kernels do."""

    @functools.wraps(launcher)
    def run(first, *args):
        with autocast_off(first.device.type):
            return launcher(first, *args)

    return run


def _chunks(selection, B, H, N, P):
    """(start, end, selection bool [B, 1, c, P]) of the query chunks."""
    step = max(1, min(N, CHUNK_ELEMENTS // max(1, B * H * (N + P))))
    for start in range(0, N, step):
        end = min(N, start + step)
        yield start, end, selection.rows(start, end, P)[:, None]


def _chunk_grads(qc, do, delta, k, v, pk, pv, sel, live, lse, scale, renormalize):
    """One query chunk (qc, do [B, H, c, D]; delta, lse [B, H, c]; live: the prompts each sample has, [B, 1, 1, P],
    or None): (p_tok [B, H, c, N], the probabilities that weight the prompt values [B, H, c, P], ds_tok
    [B, H, c, N], ds_prompt [B, H, c, P])."""
    sel = sel.to(qc.dtype)
    p_tok = torch.exp(scale * qc @ k.transpose(-1, -2) - lse[..., None])
    p_prompt = torch.exp(scale * qc @ pk.transpose(-1, -2) - lse[..., None])
    if renormalize:
        p_prompt = p_prompt * sel
    elif live is not None:  # the prompts a sample does not have are in no normaliser
        p_prompt = p_prompt * live
    ds_tok = p_tok * (do @ v.transpose(-1, -2) - delta[..., None])
    ds_prompt = p_prompt * (sel * (do @ pv.transpose(-1, -2)) - delta[..., None])
    return p_tok, p_prompt * sel, ds_tok, ds_prompt


@_autocast_off
def attention_forward(q, k, v, prompt_k, prompt_v, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale,
                      renormalize):
    """Returns (out [B, H, N, D] in q.dtype, a transposed view of a [B, N, H, D] buffer; lse [B, H, N] natural
    log, compute dtype). prompt_k/prompt_v [H, P, D] or [B, H, P, D] (with tasks [T, H, P, D]), or prompt_v None
    and prompt_k both, stacked on dim -4; the selection as ``Selection.op_args()``."""
    selection = Selection(mask, bits, pool_cls, len_cls, len_img, layouts=layouts)
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    cd = _compute_dtype(q.dtype)
    k, v, pk, pv = _operands(k, v, prompt_k, prompt_v, tasks, cd)
    live = _live(selection, P)
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, N, D]
    lse = torch.empty((B, H, N), dtype=cd, device=q.device)
    for start, end, sel in _chunks(selection, B, H, N, P):
        qc = q[:, :, start:end].to(cd)
        s_tok = scale * qc @ k.transpose(-1, -2)  # [B, H, c, N]
        s_prompt = scale * qc @ pk.transpose(-1, -2)  # [B, H, c, P]
        if renormalize:
            s_prompt = s_prompt.masked_fill(~sel, float("-inf"))
        elif live is not None:  # the prompts a sample does not have are in no normaliser
            s_prompt = s_prompt.masked_fill(~live, float("-inf"))
        lse_c = torch.logsumexp(torch.cat([s_tok, s_prompt], dim=-1), dim=-1)  # [B, H, c]
        o = torch.exp(s_tok - lse_c[..., None]) @ v + (torch.exp(s_prompt - lse_c[..., None]) * sel) @ pv
        out[:, :, start:end] = o.to(q.dtype)
        lse[:, :, start:end] = lse_c
    return out, lse


@_autocast_off
def attention_backward(dq, dk, dv, dprompt, grad_out, q, k, v, prompt_k, prompt_v, out, lse, mask, bits, tasks,
                       layouts, pool_cls, len_cls, len_img, scale, renormalize):
    """Writes dq, dk, dv ([B, H, N, D], any strides) and the prompt gradients into dprompt (compute dtype):
    [B, 2, H, P, D] (per-sample gradients, also of a bank's sets (tasks), or per-sample partials of shared
    prompts), or [2, H, P, D], to which their batch sum is added (as the kernel's atomics do)."""
    selection = Selection(mask, bits, pool_cls, len_cls, len_img, layouts=layouts)
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    cd = _compute_dtype(q.dtype)
    k, v, pk, pv = _operands(k, v, prompt_k, prompt_v, tasks, cd)
    live = _live(selection, P)
    acc_dk, acc_dv = torch.zeros_like(k), torch.zeros_like(v)  # [B, H, N, D]
    acc_prompt = torch.zeros((B, 2, H, P, D), dtype=cd, device=q.device)
    for start, end, sel in _chunks(selection, B, H, N, P):
        qc, do = q[:, :, start:end].to(cd), grad_out[:, :, start:end].to(cd)
        delta = (do * out[:, :, start:end].to(cd)).sum(-1)  # [B, H, c]
        p_tok, p_prompt, ds_tok, ds_prompt = _chunk_grads(qc, do, delta, k, v, pk, pv, sel, live,
                                                          lse[:, :, start:end], scale, renormalize)
        dq[:, :, start:end] = scale * (ds_tok @ k + ds_prompt @ pk)
        acc_dk += scale * ds_tok.transpose(-1, -2) @ qc
        acc_dv += p_tok.transpose(-1, -2) @ do
        acc_prompt[:, 0] += scale * ds_prompt.transpose(-1, -2) @ qc
        acc_prompt[:, 1] += p_prompt.transpose(-1, -2) @ do
    dk.copy_(acc_dk)
    dv.copy_(acc_dv)
    if dprompt.dim() == 5:
        dprompt.copy_(acc_prompt)
    else:
        dprompt.add_(acc_prompt.sum(0))


def _live(selection, P):
    """The prompts each sample has, bool [B, 1, 1, P] (``Selection.layouts``), or None: all."""
    live = selection.live(P)
    return None if live is None else live[:, None]


def _split_qkv(qkv):
    """[B, N, 3, H, D] -> q, k, v [B, H, N, D] views."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _heads(x, num_heads):
    """[B, N, H*D] -> [B, H, N, D] view."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def packed_forward(qkv, prompt_kv, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize):
    """``attention_forward`` on qkv [B, N, 3, H, D] and prompt_kv [2, H, P, D] or [B, 2, H, P, D] (with tasks
    [T, 2, H, P, D]): (out [B, N, H*D] contiguous, lse [B, H, N])."""
    out, lse = attention_forward(*_split_qkv(qkv), prompt_kv, None, mask, bits, tasks, layouts, pool_cls, len_cls,
                                 len_img, scale, renormalize)
    return out.transpose(1, 2).flatten(2), lse


def packed_backward(dqkv, dprompt, grad_out, qkv, prompt_kv, out, lse, mask, bits, tasks, layouts, pool_cls, len_cls,
                    len_img, scale, renormalize):
    """``attention_backward`` on the packed layouts: out and grad_out [B, N, H*D]; writes dq, dk, dv into dqkv
    [B, N, 3, H, D] and the prompt gradients into dprompt."""
    H = qkv.shape[3]
    attention_backward(*_split_qkv(dqkv), dprompt, _heads(grad_out, H), *_split_qkv(qkv), prompt_kv, None,
                       _heads(out, H), lse, mask, bits, tasks, layouts, pool_cls, len_cls, len_img, scale, renormalize)
