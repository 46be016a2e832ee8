"""Bad input gets a clear error naming the argument, the expected and the received value."""

import pytest
import torch

import tcpa_kernels as tk
from tests.conftest import attention_inputs


def _good():
    (q, k, v, pk, pv), mask = attention_inputs(2, 2, 5, 3, 16, device="cpu")
    return dict(q=q, k=k, v=v, prompt_k=pk, prompt_v=pv, prompt_mask=mask)


def _call(backend="torch", **override):
    args = {**_good(), **override}
    return tk.tcpa_attention(*args.values(), backend=backend)


@pytest.mark.parametrize(
    "override, error, words",
    [
        (dict(q=torch.randn(2, 5, 16)), ValueError, ["q:", "4-d", "(2, 5, 16)"]),
        (dict(k=torch.randn(2, 2, 6, 16)), ValueError, ["k:", "(2, 2, 5, 16)", "(2, 2, 6, 16)"]),
        (dict(v=torch.randn(2, 2, 5, 16, dtype=torch.float16)), TypeError, ["v:", "float32", "float16"]),
        (dict(q=torch.randint(0, 3, (2, 2, 5, 16))), TypeError, ["q:", "int64"]),
        (dict(prompt_k=torch.randn(3, 3, 16)), ValueError, ["prompt_k:", "(2, 3, 16)", "(3, 3, 16)"]),
        (dict(prompt_v=torch.randn(2, 4, 16)), ValueError, ["prompt_v:", "(2, 3, 16)", "(2, 4, 16)"]),
        (dict(prompt_k=torch.randn(2, 0, 16), prompt_v=torch.randn(2, 0, 16)), ValueError, ["prompt_k:", "P >= 1"]),
        (dict(prompt_mask=torch.ones(2, 5, 3)), TypeError, ["prompt_mask:", "torch.bool", "float32"]),
        (dict(prompt_mask=torch.ones(2, 5, 4).bool()), ValueError, ["prompt_mask:", "(2, 5, 3)", "(2, 5, 4)"]),
        (dict(q=[1, 2]), TypeError, ["q:", "torch.Tensor", "list"]),
    ],
)
def test_tcpa_attention_errors(override, error, words):
    with pytest.raises(error) as info:
        _call(**override)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_backend_and_kernel_limits():
    with pytest.raises(ValueError, match="backend: expected one of"):
        _call(backend="cuda")
    (q, k, v, pk, pv), mask = attention_inputs(1, 1, 3, 2, 160, device="cpu")
    expected = r"q: head dim must be <= 128 for backend='triton', got shape \(1, 1, 3, 160\)"
    with pytest.raises(ValueError, match=expected):
        tk.tcpa_attention(q, k, v, pk, pv, mask, backend="triton")
    (q, k, v, pk, pv), mask = attention_inputs(1, 1, 3, 2, 16, device="cpu", dtype=torch.float64)
    with pytest.raises(TypeError, match="q: expected dtype in"):
        tk.tcpa_attention(q, k, v, pk, pv, mask, backend="triton")
    tk.tcpa_attention(q, k, v, pk, pv, mask, backend="torch")  # fp64 is fine on the torch backend


def test_match_prompts_errors():
    x, kc, ki = torch.randn(2, 5, 8), torch.randn(3, 8), torch.randn(4, 8)
    cases = [
        (dict(x=torch.randn(5, 8)), ValueError, "x: expected 3-d"),
        (dict(keys_cls=torch.randn(3, 9)), ValueError, "keys_cls: expected shape (pool >= 1, 8)"),
        (dict(keys_img=torch.randn(4, 8, dtype=torch.float64)), TypeError, "keys_img: expected dtype torch.float32"),
        (dict(topk_cls=4), ValueError, "topk_cls: expected an int in [1, 3], got 4"),
        (dict(topk_img=0), ValueError, "topk_img: expected an int in [1, 4], got 0"),
        (dict(num_prefix_tokens=6), ValueError, "num_prefix_tokens: expected an int in [0, 5], got 6"),
        (dict(prompt_len_cls=0), ValueError, "prompt_len_cls: expected an int >= 1, got 0"),
        (dict(keys_img=torch.randn(62, 8)), ValueError, "pool_cls + pool_img <= 64"),
    ]
    for override, error, text in cases:
        args = dict(x=x, keys_cls=kc, keys_img=ki, topk_cls=2, topk_img=2) | override
        with pytest.raises(error) as info:
            tk.match_prompts(**args)
        assert text in str(info.value), (text, str(info.value))


def test_fused_errors():
    (q, k, v, pk, pv), _ = attention_inputs(2, 2, 5, 6, 16, device="cpu")
    kw = dict(pool_cls=2, topk_cls=1, topk_img=2, backend="torch")
    with pytest.raises(ValueError, match=r"scores: expected shape \(2, 5, pool_cls \+ pool_img\)"):
        tk.tcpa_fused_attention(q, k, v, pk, pv, torch.rand(2, 4, 6), **kw)
    with pytest.raises(ValueError, match=r"prompt_k: expected P = 2\*1 \+ 3\*1 = 5 prompts"):
        tk.tcpa_fused_attention(q, k, v, pk, pv, torch.rand(2, 5, 5), **kw)
    with pytest.raises(ValueError, match="topk_img: expected an int in"):
        tk.tcpa_fused_attention(q, k, v, pk, pv, torch.rand(2, 5, 6), **(kw | dict(topk_img=5)))


@pytest.mark.parametrize("triton_version, numpy_version, fails", [("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
                                                                   ("3.7.0", "2.4.1", False)])
def test_interpreter_numpy_incompatibility_is_named(monkeypatch, triton_version, numpy_version, fails):
    """Triton 3.6's interpreter breaks on numpy >= 2.4: say so instead of an interpreter TypeError."""
    import numpy
    import triton

    from tcpa_kernels._backend import resolve_backend

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if fails:
        with pytest.raises(RuntimeError, match=f"triton {triton_version} fails with numpy {numpy_version}"):
            resolve_backend("triton", torch.device("cpu"))
    else:
        assert resolve_backend("triton", torch.device("cpu")) == "triton"
