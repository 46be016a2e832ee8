"""PyTorch backend of prompt-augmented attention: the kernels' math, chunked over query tokens.

Used for CPU tensors (backend="auto") and as backend="torch" anywhere. Forward saves only lse; the
backward recomputes probabilities chunk by chunk, so memory stays O(B*H*chunk*(N+P)) instead of
O(B*H*N*(N+P)). Works in float64 too (the kernels do not).
"""

import torch

CHUNK_ELEMENTS = 1 << 24  # scores per chunk: 64 MB in fp32


def _chunk_rows(B, H, N, P):
    return max(1, min(N, CHUNK_ELEMENTS // max(1, B * H * (N + P))))


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prompts4(t):
    return t if t.dim() == 4 else t.unsqueeze(0)  # [B|1, H, P, D]


def _chunk_probs(qc, k, pk, sel, lse, scale, renormalize):
    """Probabilities of one query chunk. qc [B,H,c,D] -> p_tok [B,H,c,N], p_prompt [B,H,c,P], sel [B,1,c,P]."""
    p_tok = torch.exp(scale * qc @ k.transpose(-1, -2) - lse[..., None])
    p_prompt = torch.exp(scale * qc @ pk.transpose(-1, -2) - lse[..., None])
    if renormalize:
        p_prompt = p_prompt * sel
    return p_tok, p_prompt


def attention_forward(q, k, v, prompt_k, prompt_v, selection, scale, renormalize):
    """Returns (out [B, H, N, D] in q.dtype, lse [B, H, N] natural log, compute dtype)."""
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    cd = _compute_dtype(q.dtype)
    k, v, pk, pv = k.to(cd), v.to(cd), _prompts4(prompt_k).to(cd), _prompts4(prompt_v).to(cd)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=cd, device=q.device)
    step = _chunk_rows(B, H, N, P)
    for start in range(0, N, step):
        end = min(N, start + step)
        qc = q[:, :, start:end].to(cd)
        sel = selection.rows(start, end, P)[:, None]  # [B, 1, c, P]
        s_tok = scale * qc @ k.transpose(-1, -2)  # [B, H, c, N]
        s_prompt = scale * qc @ pk.transpose(-1, -2)  # [B, H, c, P]
        if renormalize:
            s_prompt = s_prompt.masked_fill(~sel, float("-inf"))
        lse_c = torch.logsumexp(torch.cat([s_tok, s_prompt], dim=-1), dim=-1)  # [B, H, c]
        o = torch.exp(s_tok - lse_c[..., None]) @ v + (torch.exp(s_prompt - lse_c[..., None]) * sel) @ pv
        out[:, :, start:end] = o.to(q.dtype)
        lse[:, :, start:end] = lse_c
    return out, lse


def attention_backward(grad_out, q, k, v, prompt_k, prompt_v, out, lse, selection, scale, renormalize,
                       deterministic, needs_grad):
    """Grads of (q, k, v, prompt_k, prompt_v); None where needs_grad is False. Always deterministic."""
    B, H, N, D = q.shape
    P = prompt_k.shape[-2]
    cd = _compute_dtype(q.dtype)
    k, v, pk, pv = k.to(cd), v.to(cd), _prompts4(prompt_k).to(cd), _prompts4(prompt_v).to(cd)
    dq = torch.empty((B, H, N, D), dtype=cd, device=q.device)
    dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
    dpk = torch.zeros((B, H, P, D), dtype=cd, device=q.device)
    dpv = torch.zeros_like(dpk)
    step = _chunk_rows(B, H, N, P)
    for start in range(0, N, step):
        end = min(N, start + step)
        qc, do = q[:, :, start:end].to(cd), grad_out[:, :, start:end].to(cd)
        sel = selection.rows(start, end, P)[:, None].to(cd)  # [B, 1, c, P]
        delta = (do * out[:, :, start:end].to(cd)).sum(-1, keepdim=True)  # [B, H, c, 1]
        p_tok, p_prompt = _chunk_probs(qc, k, pk, sel, lse[:, :, start:end], scale, renormalize)
        ds_tok = p_tok * (do @ v.transpose(-1, -2) - delta)  # [B, H, c, N]
        ds_prompt = p_prompt * (sel * (do @ pv.transpose(-1, -2)) - delta)  # [B, H, c, P]
        dq[:, :, start:end] = scale * (ds_tok @ k + ds_prompt @ pk)
        dk += scale * ds_tok.transpose(-1, -2) @ qc
        dv += p_tok.transpose(-1, -2) @ do
        dpk += scale * ds_prompt.transpose(-1, -2) @ qc
        dpv += (p_prompt * sel).transpose(-1, -2) @ do
    if prompt_k.dim() == 3:
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    grads = (dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dpk.to(prompt_k.dtype), dpv.to(prompt_v.dtype))
    return [g if need else None for g, need in zip(grads, needs_grad)]
