"""The work model (benchmarks/work_model.py) counts what the kernels execute, and meets its target
(docs/how-it-works.md, 'Targets').

The counting test runs the real kernels in the Triton interpreter with its dot and exp2 instructions wrapped, so
the model's padded MMA FLOPs and exp2 count are checked against the executed ones at small shapes (the attention's
and the matching kernels'); the whole-layer model's bookkeeping against hand-computed figures."""

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
    """docs/how-it-works.md, 'Targets': padded MMA work and exp2 count <= 1.10x FlashAttention-2's at N+P keys; one
    kernel per direction, plus at most one small aten kernel (the batch sum of shared-prompt gradients)."""
    work = work_model.tcpa(B, H, N, P, D)
    for direction, figures in work_model.ratios(work, work_model.fa2(B, H, N, P, D)).items():
        assert figures["mma_flops"] <= 1.10 and figures["exp2"] <= 1.10, (direction, figures)
    assert work["fwd"].launches == 1 and work["bwd"].launches == 2


# ------------------------------------------------------------------------------------------- the whole layer

SMALL = work_model.LayerShape(B=2, H=2, N=5, C=32, D=16, pool_cls=3, pool_img=3, topk=2, L=2)  # M = 10 rows


def test_layer_bookkeeping_small_shape():
    """Hand-computed figures at M = B*N = 10 rows, C = 32, E = 6 entries (E_PAD 16), k 2, L 2."""
    ours, base = work_model.layer(SMALL, True), work_model.layer(SMALL, False)
    # GEMMs, the same in both layers: qkv, proj, fc1, fc2 forward; their input gradients backward; the elementwise
    # kernels too, but for the attention's residual gradient add, which TCPA's matching backward does
    assert ours["GEMMs"] == base["GEMMs"] and ours["elementwise"]["fwd"] == base["elementwise"]["fwd"]
    assert ours["elementwise"]["bwd"][:-1] == base["elementwise"]["bwd"][:-1]
    assert (ours["elementwise"]["bwd"][-1].launches, base["elementwise"]["bwd"][-1].launches) == (1, 2)
    for direction in ("fwd", "bwd"):
        assert [k.tc16 for k in ours["GEMMs"][direction]] == [2 * 10 * 96 * 32, 2 * 10 * 32 * 32, 2 * 10 * 128 * 32,
                                                              2 * 10 * 32 * 128]
    assert ours["GEMMs"]["fwd"][0].hbm_bytes == 2 * (10 * 32 + 32 * 96 + 10 * 96 + 96)  # h, W, out, bias (bf16)
    # matching forward: 64-row x 32-channel tiles -> 64 rows x 16 entries x 32 channels, 3xTF32; 2 argmax passes
    (fwd,), (bwd,) = ours["norm1 | matching"]["fwd"], ours["norm1 | matching"]["bwd"]
    assert (fwd.tf32, fwd.tc16, fwd.cuda) == (3 * 2 * 64 * 16 * 32, 0, 4 * 2 * 64 * 16)
    # x read, h written (fp32), mean + rstd, norm weight + bias, keys, words + terms
    assert fwd.hbm_bytes == 1280 + 1280 + 80 + 256 + 6 * 32 * 4 + 10 * (8 + 4)
    # backward: 32-row x 16-channel tiles, 3 dot passes of 3 TF32 MMAs; x, dh read, dx written, mean + rstd, norm
    # weight, keys, words + dterms, one program's [6, 32] fp32 partial, the residual's gradient read (fp32)
    assert (bwd.tf32, bwd.launches) == (3 * 3 * 2 * 32 * 16 * 32, 1)
    assert bwd.hbm_bytes == 3 * 1280 + 80 + 128 + 768 + 10 * (8 + 4) + 768 + 1280
    # the no-prompt norm1: the same bytes less the matching's
    assert base["norm1 | matching"]["fwd"][0].hbm_bytes == 1280 + 1280 + 80 + 256
    assert base["norm1 | matching"]["bwd"][0].hbm_bytes == 3 * 1280 + 80 + 128
    # the key-gradient partials' sum: 1 partial read, the gradient written; the prompt K/V kernel per layer: 6
    # prompt rows in a 32-row block, 2C = 64 columns, C = 32 channels (a 64-channel tile backward), 3xTF32 (twice
    # in the backward)
    assert ours["reductions"]["bwd"][0].hbm_bytes == 2 * 6 * 32 * 4
    prompt_fwd, prompt_bwd = ours["prompt K/V (model / L)"]["fwd"][-1], ours["prompt K/V (model / L)"]["bwd"][-1]
    assert (prompt_fwd.tf32, prompt_bwd.tf32) == (3 * 2 * 32 * 64 * 32, 2 * 3 * 2 * 32 * 64 * 64)
    # launches: norm1 | matching 1, attention 1, GEMMs 4, casts 2 + 8, residual adds 2, norm2 1, GELU 1; TCPA
    # also the prompt K/V's cat and kernel and the loss terms' stack + sum (4) per model. Backward: norm1 | matching
    # 1, attention 3 (FA2) + 2 (dqkv packing) | 2 (TCPA + prompt-gradient sum), GEMMs 4, casts 4, GELU 1, norm2 1,
    # adds 2 (TCPA: 1); TCPA also the prompt K/V's stack and kernel per model and the key-gradient sum
    launches = {(p, d): sum(k.launches for k in work_model.layer_kernels(m, d))
                for p, m in (("tcpa", ours), ("base", base)) for d in ("fwd", "bwd")}
    assert launches == {("base", "fwd"): 20, ("tcpa", "fwd"): 20 + 4 / 2, ("base", "bwd"): 18,
                        ("tcpa", "bwd"): 14 + 2 / 2 + 1}


def test_roofline():
    assert work_model.Kernel(tf32=494e6, hbm_bytes=3.35e3, launches=0).seconds() == pytest.approx(1e-6)
    assert work_model.Kernel(tc16=989e6, cuda=67e6, hbm_bytes=3.35e6, launches=2).seconds() == pytest.approx(9e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matching_model_counts_executed_dots(dtype):
    """The matching kernels' tensor-core FLOPs as the interpreter executes their dots (C = 40: channel tiles
    padded): a 16-bit operand x, 2 dots per product; both fp32 (fp32 x; the backward's dx pass), one tf32x3 dot,
    which is 3 TF32 MMAs on a GPU."""
    from tcpa_kernels.ops import _match_kernels as kernels

    s = work_model.LayerShape(B=2, H=1, N=5, C=40, D=16, pool_cls=3, pool_img=3, topk=2, L=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.B, s.N, s.C, generator=g).to(dtype)
    keys_cls, keys_img = torch.randn(3, s.C, generator=g), torch.randn(3, s.C, generator=g)
    weight, bias = torch.randn(s.C, generator=g), torch.randn(s.C, generator=g)
    with executed_work() as forward:
        terms, bits, h, mean, rstd = kernels.forward(x, keys_cls, keys_img, None, None, weight, bias, 1e-6, True, 1, 2,
                                                     2)
    with executed_work() as backward:
        kernels.backward(torch.ones_like(terms), torch.randn_like(h), torch.randn_like(x), x, keys_cls, keys_img, None,
                         None, bits, weight, mean, rstd, 1, 2, 2, True, True)
    model = work_model.matching(s, x_size=x.element_size())
    for direction, executed in (("fwd", forward), ("bwd", backward)):
        (kernel,) = model[direction]
        assert executed["mma_flops"] == kernel.tc16 + kernel.tf32 / 3, direction


def test_prompt_kv_model_counts_executed_dots():
    """The prompt K/V kernels' tensor-core FLOPs as the interpreter executes their dots (fp32: one tf32x3 dot, 3 TF32
    MMAs on a GPU): 9 prompt rows, C = 40 (padded channel tiles), 2 layers."""
    from tcpa_kernels.ops import _prompt_kv_kernels as kernels
    from tcpa_kernels.ops import _prompt_kv_table

    s = work_model.LayerShape(B=1, H=2, N=1, C=40, D=20, pool_cls=4, pool_img=5, topk=2, L=2)
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(3 * s.C, s.C, generator=g),) * 2 + (torch.randn(s.C, generator=g),) * 2
              + (torch.randn(3 * s.C, generator=g),) * 2 for _ in range(s.L)]
    table = _prompt_kv_table.weight_table(torch.float32, s.C, (3 * s.C,) * 4, layers)
    x = torch.randn(s.L, s.P, s.C, generator=g)
    layers = _prompt_kv_table.KVLayers(table, 1, s.H, s.D, (s.C, 2 * s.C, s.C, 2 * s.C), 1e-6, True, True, True, False)
    with executed_work() as forward:
        kv, mean, rstd = kernels.forward(x, layers)
    with executed_work() as backward:
        kernels.backward(torch.randn_like(kv), x, mean, rstd, layers)
    model = work_model.prompt_kv(s)
    for direction, executed in (("fwd", forward), ("bwd", backward)):
        assert executed["mma_flops"] * s.L ** -1 == model[direction][-1].tf32 / 3, direction


def test_matching_within_gemm_budget():
    """The issue's target at docs/how-it-works.md, 'Targets': the matching kernels' tensor-core FLOPs (fwd + bwd,
    padded, 3xTF32's 3 MMAs counted) <= 5% of the no-prompt layer's GEMM FLOPs (4.17%)."""
    label, shape = work_model.LAYER_SHAPES[0]
    assert "§6" in label and shape.B == 128
    assert work_model.matching_tc_share(shape) <= 0.05


def test_layer_cli(capsys):
    work_model.main(["--section", "layer"])
    out = capsys.readouterr().out
    assert "TCPA extra per layer" in out and "TCPA kernels / FlashAttention-2" not in out
