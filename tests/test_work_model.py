"""The work model (benchmarks/work_model.py) counts what the kernels execute, and meets TCPA_SPEC.md §6's target.

The counting test runs the real kernels in the Triton interpreter with its dot and exp2 instructions wrapped, so
the model's padded MMA FLOPs and exp2 count are checked against the executed ones at small shapes."""

import contextlib

import pytest
import torch

from benchmarks import work_model
from tcpa_kernels.ops._function import token_grad_buffers
from tests.conftest import attention_inputs, random_selection

interpreter = pytest.importorskip("triton.runtime.interpreter")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts instructions in the Triton interpreter")


@contextlib.contextmanager
def executed_work():
    """{'mma_flops', 'exp2'} executed by interpreted kernels inside the block."""
    builder = interpreter.InterpreterBuilder
    counts = {"mma_flops": 0, "exp2": 0}
    create_dot, create_exp2 = builder.create_dot, builder.create_exp2

    def counted_dot(self, a, b, *args):
        (m, k), n = a.data.shape, b.data.shape[1]
        counts["mma_flops"] += 2 * m * n * k
        return create_dot(self, a, b, *args)

    def counted_exp2(self, arg):
        counts["exp2"] += arg.data.size
        return create_exp2(self, arg)

    builder.create_dot, builder.create_exp2 = counted_dot, counted_exp2
    try:
        yield counts
    finally:
        builder.create_dot, builder.create_exp2 = create_dot, create_exp2


@pytest.mark.parametrize("shape", [(2, 2, 19, 6, 32), (1, 2, 70, 40, 16), (1, 1, 64, 64, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_counts_executed_work(shape, dtype):
    from tcpa_kernels.ops import _attention_kernels as kernels

    B, H, N, P, D = shape
    q, k, v, pk, pv = (t.detach() for t in attention_inputs(*shape, dtype=dtype)[0])
    selection = random_selection(B, N, P, 2, 1, 1)
    model = work_model.tcpa(B, H, N, P, D, dtype=dtype, prompt_dtype=dtype)
    with executed_work() as forward:
        out, lse = kernels.attention_forward(q, k, v, pk, pv, *selection.op_args(), D**-0.5, False)
    dq, dk, dv = token_grad_buffers(out)
    dprompt = torch.empty((B, 2, H, P, D), dtype=torch.float32)
    with executed_work() as backward:
        kernels.attention_backward(dq, dk, dv, dprompt, torch.randn_like(out), q, k, v, pk, pv, out, lse,
                                   *selection.op_args(), D**-0.5, False)
    for direction, executed in (("fwd", forward), ("bwd", backward)):
        assert executed == {"mma_flops": model[direction].mma_flops, "exp2": model[direction].exp2}, direction


@pytest.mark.parametrize("label, B, H, N, P, D", work_model.SHAPES, ids=[s[0] for s in work_model.SHAPES])
def test_within_flash_attention_budget(label, B, H, N, P, D):
    """TCPA_SPEC.md §6: padded MMA work and exp2 count <= 1.10x FlashAttention-2's at N+P keys; one kernel per
    direction, plus at most one small aten kernel (the batch sum of shared-prompt gradients)."""
    work = work_model.tcpa(B, H, N, P, D)
    for direction, figures in work_model.ratios(work, work_model.fa2(B, H, N, P, D)).items():
        assert figures["mma_flops"] <= 1.10 and figures["exp2"] <= 1.10, (direction, figures)
    assert work["fwd"].launches == 1 and work["bwd"].launches == 2
