"""TCPA_SPEC §6, op peak memory: the Triton op allocates no tensor of size B*H*N*(N+P), in the forward or the
backward; it never materialises attention probabilities or a dense mask. Every tensor an aten op returns
while the op runs (kernel outputs are allocated through torch) is recorded by a dispatch mode."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tcpa_kernels as tk
from reference import tcpa_attention_ref
from tests.conftest import DEVICE, attention_inputs

B, H, N, D = 2, 2, 48, 16
POOL_CLS, POOL_IMG, LEN_CLS, LEN_IMG = 4, 8, 2, 4
P = POOL_CLS * LEN_CLS + POOL_IMG * LEN_IMG  # 40 > D: a [B, H, N, P] tensor is larger than q


class LargestAllocation(TorchDispatchMode):
    """Shape of the largest tensor any op returns while active (views and in-place results included: they
    are never larger than what they alias)."""

    def __init__(self):
        super().__init__()
        self.shape = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > torch.Size(self.shape).numel():
                self.shape = tuple(t.shape)
        return out


def largest_allocation(fn, tensors):
    """Largest tensor allocated by fn()'s forward and backward."""
    with LargestAllocation() as mode:
        out = fn()
        torch.autograd.grad(out, tensors, torch.ones_like(out))
    return mode.shape


def explicit_mask(tensors, mask):
    return tk.tcpa_attention(*tensors, mask, backend="triton")


def fused_topk(tensors, mask):
    scores = torch.rand(B, N, POOL_CLS + POOL_IMG, device=DEVICE)
    return tk.tcpa_fused_attention(*tensors, scores, pool_cls=POOL_CLS, topk_cls=2, topk_img=3,
                                   prompt_len_cls=LEN_CLS, prompt_len_img=LEN_IMG, num_prefix_tokens=1,
                                   backend="triton")[0]


@pytest.mark.parametrize("op", [explicit_mask, fused_topk])
@pytest.mark.parametrize("shared", [True, False])
def test_no_tensor_of_attention_size(op, shared):
    tensors, mask = attention_inputs(B, H, N, P, D, shared=shared)
    shape = largest_allocation(lambda: op(tensors, mask), tensors)
    assert torch.Size(shape).numel() < B * H * N * P, (
        f"{op.__name__}: allocated a {shape} tensor, as large as [B, H, N, P] = {[B, H, N, P]} or more")


def test_the_check_sees_a_dense_implementation():
    """The same check on the dense reference finds its [B, H, N, N+P] probabilities."""
    tensors, mask = attention_inputs(B, H, N, P, D)
    shape = largest_allocation(lambda: tcpa_attention_ref(*tensors, mask), tensors)
    assert torch.Size(shape).numel() >= B * H * N * (N + P)
