"""``TCPAAttention``: top-k prompt selection fused with prompt-augmented attention.

The op takes the matching scores ``[B, N, Pc+Pi]`` instead of a mask. A Triton kernel turns each token's
scores into one 64-bit selection word (top-k of its own pool), and the attention kernels read that word
per query row: neither a ``[B, N, P]`` mask nor a ``[B, H, N, N+P]`` tensor is ever built.
"""

import torch

from tcpa_kernels._validate import FLOAT_DTYPES, check_int, check_pool_config, check_tensor, describe
from tcpa_kernels.ops._function import refuse_double_backward, run_backward, run_forward, topk_bits_op
from tcpa_kernels.ops.tcpa_attention import prepare_attention


class TCPAAttention(torch.autograd.Function):
    """Fused top-k selection + TCPA attention (docs/how-it-works.md, 'Matching and selection' to 'Attention').

    ``TCPAAttention.apply(q, k, v, prompt_k, prompt_v, scores, pool_cls, topk_cls, topk_img,
    prompt_len_cls, prompt_len_img, num_prefix_tokens, scale, renormalize, backend, deterministic)``
    returns ``(out, bits)``.

    q, k, v ``[B, H, N, D]``; prompt_k/prompt_v ``[H, P, D]`` or ``[B, H, P, D]`` with
    ``P = pool_cls*prompt_len_cls + (E-pool_cls)*prompt_len_img`` (CLS-pool prompts first); scores
    ``[B, N, E]`` with the ``pool_cls`` CLS-pool columns first (cosine matching scores, or random numbers
    for random selection). ``backend`` is "triton" or "torch" (resolved). ``out`` is ``[B, H, N, D]``;
    ``bits`` (int64 ``[B, N]``, bit e = pool entry e selected, not differentiable) feeds
    :func:`tcpa_kernels.matching_loss`. Use the validated wrapper :func:`tcpa_fused_attention`.
    """

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scores, pool_cls, topk_cls, topk_img, prompt_len_cls,
                prompt_len_img, num_prefix_tokens, scale, renormalize, backend, deterministic):
        bits = topk_bits_op(scores.detach(), None, num_prefix_tokens, pool_cls, topk_cls, topk_img, backend)  # [B, N]
        out = run_forward(ctx, q, k, v, prompt_k, prompt_v, None, bits, None, None,
                          (pool_cls, prompt_len_cls, prompt_len_img), scale, renormalize, backend, deterministic)
        ctx.mark_non_differentiable(bits)
        return out, bits

    @staticmethod
    def backward(ctx, grad_out, grad_bits):
        refuse_double_backward("tcpa_fused_attention")
        return (*run_backward(ctx, grad_out), *([None] * 11))


def tcpa_fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                         prompt_v: torch.Tensor, scores: torch.Tensor, *, pool_cls: int, topk_cls: int, topk_img: int,
                         prompt_len_cls: int = 1, prompt_len_img: int = 1, num_prefix_tokens: int = 1,
                         scale: float | None = None, renormalize: bool = False, backend: str = "auto",
                         deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated entry to :class:`TCPAAttention`: each token attends to the prompts of its top-k pool entries.

    Args:
        q, k, v, prompt_k, prompt_v, scale, renormalize, backend, deterministic: as in ``tcpa_attention``.
        scores: ``[B, N, E]`` matching scores (``tcpa_kernels.match_scores``), CLS-pool columns first.
        pool_cls: number of CLS-pool entries (the image pool has ``E - pool_cls``).
        topk_cls, topk_img, prompt_len_cls, prompt_len_img, num_prefix_tokens: as in ``match_prompts``.

    Returns:
        ``(out [B, H, N, D], bits int64 [B, N])``; ties in scores go to the lower entry index.
    """
    backend, scale, (B, H, N, P, D) = prepare_attention(q, k, v, prompt_k, prompt_v, backend, scale, renormalize,
                                                        deterministic)
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    E = scores.shape[-1]
    if scores.device != q.device or tuple(scores.shape[:2]) != (B, N) or E < 2:
        raise ValueError(f"scores: expected shape ({B}, {N}, pool_cls + pool_img) on {q.device}, "
                         f"got {describe(scores)}")
    check_int("pool_cls", pool_cls, 1, E - 1)
    check_pool_config("scores ", pool_cls, E - pool_cls, topk_cls, topk_img, prompt_len_cls, prompt_len_img,
                      num_prefix_tokens, N)
    expected_p = pool_cls * prompt_len_cls + (E - pool_cls) * prompt_len_img
    if P != expected_p:
        raise ValueError(f"prompt_k: expected P = {pool_cls}*{prompt_len_cls} + {E - pool_cls}*{prompt_len_img} = "
                         f"{expected_p} prompts, got {describe(prompt_k)}")
    return TCPAAttention.apply(q, k, v, prompt_k, prompt_v, scores, pool_cls, topk_cls, topk_img, prompt_len_cls,
                               prompt_len_img, num_prefix_tokens, scale, renormalize, backend, deterministic)
