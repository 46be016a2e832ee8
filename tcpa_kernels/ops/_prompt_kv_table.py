"""The host side of the prompt K/V kernels (``ops/_prompt_kv_kernels.py``; docs/how-it-works.md, 'Prompt keys and
values'), plain torch (no triton: the model path reads it while torch.compile traces): the table of the frozen
weights' addresses the kernels read them through, what the kernels can read, their layers' description
(``KVLayers``) and the prompt-dropout seed they draw their masks from."""

from typing import NamedTuple

import torch

TABLE_COLUMNS = 6  # key weight, value weight, norm weight, norm bias, key bias, value bias
# Distinct address sets kept (a model's parameters do not move between steps). A table is never dropped before
# that many: a step captured in CUDA graphs (torch.compile, mode="reduce-overhead") reads the table it was
# captured with at every replay, so it must outlive the graph; a table is L * 6 int64s.
_MAX_TABLES = 4096
_tables: dict = {}  # (device, dtype, C, rows, addresses) -> table or None
_UNSEEN = object()


class KVLayers(NamedTuple):
    """The layers the kernels project through: ``table`` (``weight_table``), the prompt sets per layer (M = sets * P
    rows of x), the K/V heads and head dim, the key and value blocks' first rows ``rows`` (of the key weight, the
    value weight, the key bias, the value bias), the norm's eps (None: no norm) and whether the norm has a weight and
    a bias and the projection a bias, and whether the sets share x's rows (``shared``: x [L, P, C] read by every set,
    each with its own dropout mask)."""

    table: torch.Tensor
    sets: int
    heads: int
    head_dim: int
    rows: tuple[int, int, int, int]
    eps: float | None
    has_w: bool
    has_b: bool
    has_bias: bool
    shared: bool = False


def kv_layers(dtype: torch.dtype, C: int, layers: list[tuple], sets: int, heads: int, head_dim: int,
              rows: tuple[int, int, int, int], eps: float | None, shared: bool) -> KVLayers | None:
    """The ``KVLayers`` of ``layers`` (per layer the table's tensors, as ``readable`` takes them) for x of ``dtype``
    with C channels, or None unless ``readable`` (``weight_table``)."""
    table = weight_table(dtype, C, rows_needed(rows, heads, head_dim), layers)
    if table is None:
        return None
    first = layers[0]
    return KVLayers(table, sets, heads, head_dim, rows, eps, first[2] is not None, first[3] is not None,
                    first[4] is not None, shared)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A prompt-dropout seed for the kernels: int64 [1] on ``device``, drawn from torch's generator there (so
    ``torch.manual_seed`` replays it, and CUDA graphs draw a new one at each replay), read by the kernels on the
    device (no sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def rows_needed(rows: tuple[int, int, int, int], heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """The rows the key weight, value weight, key bias and value bias need at least: each block's first row (``rows``)
    plus its H * D rows."""
    half = heads * head_dim
    return tuple(start + half for start in rows)


def readable(dtype: torch.dtype, C: int, rows: tuple[int, int, int, int], layers: list[tuple]) -> bool:
    """Whether the kernels can read ``layers`` (per layer: key weight, value weight, norm weight, norm bias, key
    bias, value bias; None where absent): every tensor ``dtype`` on one device and contiguous, each weight
    [>= rows, C] and each bias [>= rows] (``rows``: the rows the key and value blocks need of the weights and of the
    biases), each norm parameter [C]."""
    device = layers[0][0].device
    least = ((rows[0], C), (rows[1], C), (C,), (C,), (rows[2],), (rows[3],))  # what each column needs at least
    return all(t is None or (t.dtype == dtype and t.device == device and t.dim() == len(need)
                             and t.shape[0] >= need[0] and t.shape[1:] == need[1:] and t.is_contiguous())
               for layer in layers for t, need in zip(layer, least))


def weight_table(dtype: torch.dtype, C: int, rows: tuple[int, int, int, int],
                 layers: list[tuple]) -> torch.Tensor | None:
    """int64 [L, 6] on the tensors' device: per layer (``layers``, as ``readable`` takes them) their addresses, 0
    for None; None unless ``readable``. Made and checked once per set of addresses (the table holds no values: the
    kernels read the tensors as they are at each launch)."""
    addresses = tuple(0 if t is None else t.data_ptr() for layer in layers for t in layer)
    device = layers[0][0].device
    key = (device, dtype, C, rows, addresses)
    table = _tables.get(key, _UNSEEN)  # (one read: another thread may clear the dict)
    if table is _UNSEEN:
        ok = readable(dtype, C, rows, layers)
        with torch.inference_mode(False):  # kept across forwards: never an inference tensor
            table = torch.tensor(addresses, dtype=torch.int64).view(-1, TABLE_COLUMNS).to(device) if ok else None
        if len(_tables) >= _MAX_TABLES:
            _tables.clear()
        _tables[key] = table
    return table
