"""docs/how-it-works.md, 'Targets', op peak memory: the Triton op allocates no tensor of size B*H*N*(N+P), in the
forward or the backward; it never materialises attention probabilities or a dense mask. Every tensor an aten op
allocates while the op runs (kernel outputs are allocated through torch) is recorded by a dispatch mode
(``bench.NewAllocations``, which also gives the CPU memory figure of the benchmarks)."""

import pytest
import torch

import tcpa_kernels as tk
from reference import tcpa_attention_ref
from tcpa_kernels import bench
from tests.conftest import DEVICE, attention_inputs

B, H, N, D = 2, 2, 48, 16
POOL_CLS, POOL_IMG, LEN_CLS, LEN_IMG = 4, 8, 2, 4
P = POOL_CLS * LEN_CLS + POOL_IMG * LEN_IMG  # 40 > D: a [B, H, N, P] tensor is larger than q


def largest_allocation(fn, tensors):
    """Largest tensor allocated by fn()'s forward and backward."""
    with bench.NewAllocations() as allocations:
        out = fn()
        torch.autograd.grad(out, tensors, torch.ones_like(out))
    return allocations.largest


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
