"""Shared test helpers: input factory, fp64 comparison with a per-dtype tolerance table, NaN poisoning."""

import math
import os

import torch  # imports no triton: whether there is a GPU is known before triton is first imported

if not torch.cuda.is_available():  # the kernels run in the Triton interpreter, which must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# (atol, rtol) of a backend's result against the fp64 reference evaluated on the same (rounded) inputs.
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def attention_inputs(B, H, N, P, D, *, dtype=torch.float32, shared=True, device=DEVICE, seed=0, mask_p=0.5):
    """q, k, v [B,H,N,D]; prompt_k, prompt_v [H,P,D] or [B,H,P,D]; mask bool [B,N,P] (all leaf, requires grad)."""
    g = torch.Generator().manual_seed(seed)
    prompt_shape = (H, P, D) if shared else (B, H, P, D)
    tensors = [torch.randn(*shape, generator=g) for shape in [(B, H, N, D)] * 3 + [prompt_shape] * 2]
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    mask = (torch.rand(B, N, P, generator=g) < mask_p).to(device)
    return tensors, mask


def random_selection(B, N, P, pool_cls, len_cls, len_img, *, seed=0, device=DEVICE):
    """Selection in bits mode: random int64 words [B, N] over the pool entries of P prompts laid out as
    [pool_cls entries of len_cls tokens ; entries of len_img tokens]. ``.rows(0, N, P)`` is its [B, N, P] mask."""
    from tcpa_kernels.ops.selection import Selection

    entries = pool_cls + -(-(P - pool_cls * len_cls) // len_img)
    picked = torch.rand(B, N, entries, generator=torch.Generator().manual_seed(seed)) < 0.5
    bits = (picked.long() << torch.arange(entries)).sum(-1)  # distinct powers of two: sum == or
    return Selection(bits=bits.to(device), pool_cls=pool_cls, len_cls=len_cls, len_img=len_img)


def fp64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_matches_reference(out, grads, ref_out, ref_grads, dtype, names=("q", "k", "v", "prompt_k", "prompt_v")):
    """Output and every gradient against the fp64 reference, with the dtype's tolerance."""
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    for name, g, rg in zip(names, grads, ref_grads):
        assert g is not None, f"{name}: no gradient"
        assert g.shape == rg.shape, f"{name}: grad shape {g.shape} != {rg.shape}"
        # gradients sum over N (+P) terms: scale atol by sqrt of the reduction length
        scale = math.sqrt(max(1, out.shape[2]))
        torch.testing.assert_close(g.double(), rg, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


class _PoisonedTorch:
    """Stands in for the ``torch`` module inside kernel launchers: empty buffers come back full of garbage
    (NaN for floats, -1 i.e. every bit set for ints), so a store a kernel misses shows up in the result."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poison_buffers(monkeypatch):
    from tcpa_kernels.ops import _attention_kernels, _function, _selection_kernels, _torch_attention, packed, selection

    for module in (_attention_kernels, _function, _torch_attention, packed, selection, _selection_kernels):
        monkeypatch.setattr(module, "torch", _PoisonedTorch())


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
