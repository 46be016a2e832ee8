"""benchmarks/matching_accuracy.py: its emulation of the matching kernels' tensor-core arithmetic and its
comparison with the fp64 ranking."""

import torch

from benchmarks import matching_accuracy as accuracy


def test_tf32_rounding_keeps_ten_mantissa_bits_ties_away():
    one = 1.0
    values = torch.tensor([one + 2**-12, one + 2**-11, one + 3 * 2**-11, -(one + 2**-11), one + 2**-10])
    want = torch.tensor([one, one + 2**-10, one + 2 * 2**-10, -(one + 2**-10), one + 2**-10])
    assert torch.equal(accuracy.round_tf32(values), want)


def test_split_products_reach_fp32_accuracy_one_pass_does_not():
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(64, 768, generator=g), torch.rand(36, 768, generator=g) * 2 - 1
    scale = float((x.double().abs() @ keys.double().abs().T).max())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        exact = xd.double() @ keys.double().T  # the products of the rounded inputs
        split = (accuracy.emulated_dots(xd, keys, "tensor_cores").double() - exact).abs().max() / scale
        one_pass = (accuracy.emulated_dots(xd, keys, "one_pass").double() - exact).abs().max() / scale
        assert split < 1e-6 < one_pass, (dtype, split, one_pass)


def test_script_reports_every_dtype_and_no_selection_change_outside_near_ties(tmp_path):
    rows = accuracy.main(["--batch", "1", "--out", str(tmp_path)])
    assert {(r["dtype"], r["arithmetic"]) for r in rows} >= {("fp32", "ieee"), ("fp32", "tensor_cores"),
                                                             ("bf16", "tensor_cores"), ("fp16", "tensor_cores")}
    assert all(r["tokens"] == 197 and r["outside_near_ties"] == 0 for r in rows if r["arithmetic"] != "one_pass")
    assert [p.name for p in tmp_path.iterdir()] == ["matching-accuracy-cpu-emulation.json"]
