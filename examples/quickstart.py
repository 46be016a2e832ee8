"""Smallest end-to-end use of the ops: match tokens to prompts, run TCPA attention, backprop.

    python examples/quickstart.py
"""

import torch

import tcpa_kernels as tk

device = "cuda" if torch.cuda.is_available() else "cpu"
B, N, C, H = 2, 17, 64, 4  # batch, tokens (CLS + 16 patches), width, heads
D = C // H
pool_cls, pool_img, topk = 6, 6, 3

x = torch.randn(B, N, C, device=device)  # block input (residual stream)
keys_cls = torch.empty(pool_cls, C, device=device).uniform_(-1, 1).requires_grad_()
keys_img = torch.empty(pool_img, C, device=device).uniform_(-1, 1).requires_grad_()
q, k, v = torch.randn(3, B, H, N, D, device=device).unbind(0)
prompt_k = torch.randn(H, pool_cls + pool_img, D, device=device, requires_grad=True)  # shared by the batch
prompt_v = torch.randn(H, pool_cls + pool_img, D, device=device, requires_grad=True)

# 1) explicit mask: match_prompts -> bool [B, N, P] -> tcpa_attention
mask, match_loss = tk.match_prompts(x, keys_cls, keys_img, topk_cls=topk, topk_img=topk)
out = tk.tcpa_attention(q, k, v, prompt_k, prompt_v, mask)  # [B, H, N, D]

# 2) fused: scores -> in-kernel top-k -> attention (no mask tensor)
scores = tk.match_scores(x, keys_cls, keys_img)  # [B, N, pool_cls + pool_img]
out_fused, bits = tk.tcpa_fused_attention(q, k, v, prompt_k, prompt_v, scores, pool_cls=pool_cls,
                                          topk_cls=topk, topk_img=topk)
loss = out_fused.square().mean() + 0.01 * tk.matching_loss(scores, bits, 1, topk, topk)
loss.backward()
print(f"device={device}  out {tuple(out.shape)}  fused == masked: {torch.allclose(out, out_fused, atol=1e-5)}")
print(f"matching loss {match_loss.item():.4f}  |grad prompt_k| {prompt_k.grad.norm():.4f}  "
      f"|grad keys_img| {keys_img.grad.norm():.4f}")
