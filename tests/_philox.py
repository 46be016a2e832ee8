"""The prompt K/V kernels' dropout multipliers, drawn again from their definition for the fp64 references
(``ops/_prompt_kv_kernels.py``, 'Prompt dropout'): element i of x [L, M, C] in flat order is kept, times 1 / (1 - p),
where Philox ``tl.rand(seed, i) >= p``; and a record of the seeds the kernels' node draws."""

import torch
import triton
import triton.language as tl

from tcpa_kernels.ops import _prompt_kv_table


@triton.jit
def _multipliers_kernel(SEED, OUT, n, p, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    keep = tl.rand(tl.load(SEED), i) >= p
    tl.store(OUT + i, tl.where(keep, 1.0 / (1.0 - p), 0.0).to(tl.float64), mask=i < n)


def philox_multipliers(seed: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """fp64 multipliers of ``shape`` (x's, [L, M, C] or any view of it in the same order), 0 or 1 / (1 - p)."""
    out = torch.empty(shape, dtype=torch.float64, device=seed.device)
    _multipliers_kernel[(triton.cdiv(out.numel(), 256),)](seed, out, out.numel(), p, BLOCK=256)
    return out


def recorded_seeds(monkeypatch) -> list[torch.Tensor]:
    """The seeds the prompt K/V node draws from now on (a list, one per draw)."""
    module, seeds = _prompt_kv_table, []
    draw = module.dropout_seed

    def recording(device):
        seeds.append(draw(device))
        return seeds[-1]

    monkeypatch.setattr(module, "dropout_seed", recording)
    return seeds
