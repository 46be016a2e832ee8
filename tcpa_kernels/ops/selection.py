"""Top-k prompt selection: per token, a 64-bit word whose bit e says "pool entry e is selected".

The attention kernels read one int64 per token instead of a [B, N, P] mask: prompt token p belongs to
pool entry ``entry(p)`` (CLS entries first, then image entries) and is selected iff bit ``entry(p)`` is
set. Prefix tokens only ever get CLS bits and patch tokens only image bits, so a token never uses the
other pool's prompts.

Why selection is its own kernel and not fused into the attention kernel: the attention grid is
(batch*head, query block), so an in-attention top-k would redo the same per-token sort H times
(12x at ViT-B), while this kernel does it once per token and hands over 8 bytes per token
(B*N*8 bytes: 200 KB at ViT-B, B=128). Cosine matching is a [B*N, C] x [C, Pool] product that reads
``x``, which the attention kernel never reads (it reads per-head q/k/v), so it stays a cuBLAS GEMM
before both. These are cost arguments; the GPU measurement is tracked in issue #5.

Tie rule: among equal scores the lower entry index wins (the same as ``reference.match_prompts_ref``).
The Triton kernels are in ``_selection_kernels.py``; ``_topk_bits_torch`` is their PyTorch twin.
"""

from dataclasses import dataclass

import torch

from tcpa_kernels._backend import kernels
from tcpa_kernels._validate import MAX_POOL_ENTRIES, check_tensor, describe


def _topk_bits_torch(scores, num_prefix_tokens, pool_cls, k_cls, k_img):
    """Torch twin of the kernel. scores [B, N, E] -> bits int64 [B, N] (NaN ranks as -inf)."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    weights = torch.ones(scores.shape[-1], dtype=torch.int64, device=scores.device)
    weights = torch.bitwise_left_shift(weights, torch.arange(scores.shape[-1], device=scores.device))
    bits = torch.empty(scores.shape[:2], dtype=torch.int64, device=scores.device)
    groups = ((slice(0, num_prefix_tokens), slice(0, pool_cls), k_cls),
              (slice(num_prefix_tokens, None), slice(pool_cls, None), k_img))
    for tokens, entries, k in groups:
        s = scores[:, tokens, entries]
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        bits[:, tokens] = weights[entries][order].sum(-1)  # distinct powers of two: sum == or
    return bits


def max_topk(num_tokens, num_prefix_tokens, k_cls, k_img):
    """The largest k any row of the sequence uses (the kernels' loop count)."""
    return max(k_cls if num_prefix_tokens > 0 else 0, k_img if num_tokens > num_prefix_tokens else 0)


def topk_bits(scores, *, num_prefix_tokens, pool_cls, k_cls, k_img, backend):
    """Per-token selection words from matching scores.

    scores: [B, N, pool_cls + pool_img]; prefix tokens (the first ``num_prefix_tokens``) choose their
    top ``k_cls`` among the first ``pool_cls`` columns, patch tokens their top ``k_img`` among the rest.
    returns int64 [B, N]. Selection is not differentiable. fp64 scores take the torch twin on either backend: the
    kernel ranks on an int32 key of the fp32 value, so fp64 scores closer than fp32's resolution would tie there.
    """
    if backend == "torch" or scores.dtype == torch.float64:
        return _topk_bits_torch(scores.detach(), num_prefix_tokens, pool_cls, k_cls, k_img)
    return kernels("_selection_kernels").topk_bits(scores.detach(), num_prefix_tokens, pool_cls, k_cls, k_img)


def entry_selection(bits, num_entries):
    """bool [B, N, E] view of selection words (small: E <= 64 entries, not prompts)."""
    shifts = torch.arange(num_entries, device=bits.device)
    return (torch.bitwise_right_shift(bits[..., None], shifts) & 1).bool()


@dataclass
class Selection:
    """Which prompts each query token may use, in one of the two encodings the kernels read.

    Either ``mask`` (bool [B, N, P]) or ``bits`` (int64 [B, N]) with the pool layout that maps prompt
    tokens to entries: prompts are [CLS pool: pool_cls*len_cls tokens ; image pool: rest]. With ``tasks``
    (int32 or int64 [B]) the prompts are a bank of T prompt sets ([T, 2, H, P, D]) and sample b uses set ``tasks[b]``:
    the kernels read it in place, no per-sample copy is made.
    """

    mask: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    pool_cls: int = 0
    len_cls: int = 1
    len_img: int = 1
    tasks: torch.Tensor | None = None

    def op_args(self) -> tuple:
        """``(mask, bits, tasks, pool_cls, len_cls, len_img)``: a Selection as the custom ops take it (one of mask /
        bits is None; tasks None without a bank); the launchers take it so too."""
        return self.mask, self.bits, self.tasks, self.pool_cls, self.len_cls, self.len_img

    def rows(self, start, end, num_prompts):
        """bool [B, end-start, P] for query tokens start..end-1 (torch backend, one chunk at a time)."""
        if self.mask is not None:
            return self.mask[:, start:end]
        n_cls = self.pool_cls * self.len_cls
        p = torch.arange(num_prompts, device=self.bits.device)
        entry = torch.where(p < n_cls, p // self.len_cls, self.pool_cls + (p - n_cls) // self.len_img)
        return (torch.bitwise_right_shift(self.bits[:, start:end, None], entry) & 1).bool()


_ONE_HOT = "_tcpa_one_hot"  # the attribute of a tasks tensor that keeps its one-hot matrices, by (T, dtype)


def task_one_hot(tasks: torch.Tensor, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
    """The one-hot [num_tasks, B] matrix of the tasks (int [B]) in ``dtype``: in eager mode made once per tasks
    tensor and dtype and kept on it, so a forward's layers (which share one tasks tensor) reduce by one matrix; while
    compiling made where it is used (the graph is the place to share it, and dynamo cannot trace a tensor's
    ``__dict__``)."""
    if torch.compiler.is_compiling():
        return _one_hot(tasks, num_tasks, dtype)
    one_hots = tasks.__dict__.setdefault(_ONE_HOT, {})
    if (num_tasks, dtype) not in one_hots:
        one_hots[num_tasks, dtype] = _one_hot(tasks, num_tasks, dtype)
    return one_hots[num_tasks, dtype]


def _one_hot(tasks: torch.Tensor, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
    """1 at (tasks[b], b) of a [num_tasks, B] matrix: a fill and a scatter."""
    one_hot = torch.zeros((num_tasks, tasks.shape[0]), dtype=dtype, device=tasks.device)
    return one_hot.scatter_(0, (tasks if tasks.dtype == torch.int64 else tasks.long())[None], 1)


def sum_per_task(values: torch.Tensor, tasks: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Per-sample values [B, ...] (a view whose trailing dims flatten to one stride is read in place) summed per
    prompt set of a bank: contiguous [num_tasks, ...], sample b's added to set tasks[b]. One GEMM with the one-hot
    [num_tasks, B] matrix of the tasks (``task_one_hot``): deterministic, no atomics, and a set without samples gets
    zeros."""
    return (task_one_hot(tasks, num_tasks, values.dtype) @ values.flatten(1)).view(num_tasks, *values.shape[1:])


def check_tasks(tasks, B, T, device) -> None:
    """ValueError/TypeError unless ``tasks`` is an int32 or int64 [B] tensor on device with values in [0, T) (read
    back from the device: a sync, which the checked entries afford and the model path skips)."""
    check_tensor("selection.tasks", tasks, ndim=1, dtypes=(torch.int32, torch.int64))
    if tasks.device != device or tuple(tasks.shape) != (B,):
        raise ValueError(f"selection.tasks: expected int32/int64 shape {(B,)} on {device}, got {describe(tasks)}")
    if B and not (0 <= int(tasks.min()) and int(tasks.max()) < T):
        raise ValueError(f"selection.tasks: expected values in [0, {T}) (the prompt sets of the bank), got "
                         f"[{int(tasks.min())}, {int(tasks.max())}]")


def check_selection(selection, B, N, P, device) -> None:
    """ValueError/TypeError unless ``selection`` is a Selection for B x N query tokens and P prompts on device (its
    tasks are checked with the prompts: ``check_tasks``)."""
    if not isinstance(selection, Selection):
        raise TypeError(f"selection: expected a tcpa_kernels.ops.selection.Selection, got {type(selection).__name__}")
    if selection.mask is not None:
        check_tensor("selection.mask", selection.mask, ndim=3, dtypes=(torch.bool,))
        if selection.mask.device != device or tuple(selection.mask.shape) != (B, N, P):
            raise ValueError(f"selection.mask: expected bool shape {(B, N, P)} on {device}, "
                             f"got {describe(selection.mask)}")
        return
    if selection.bits is None:
        raise ValueError("selection: expected a mask [B, N, P] or selection words [B, N], got neither")
    check_tensor("selection.bits", selection.bits, ndim=2, dtypes=(torch.int64,))
    if selection.bits.device != device or tuple(selection.bits.shape) != (B, N):
        raise ValueError(f"selection.bits: expected int64 shape {(B, N)} on {device}, got {describe(selection.bits)}")
    pool_cls, len_cls, len_img = selection.pool_cls, selection.len_cls, selection.len_img
    n_cls = pool_cls * len_cls
    valid = pool_cls >= 0 and len_cls >= 1 and len_img >= 1 and n_cls <= P
    if not valid or pool_cls + (P - n_cls + len_img - 1) // len_img > MAX_POOL_ENTRIES:
        raise ValueError(f"selection: expected a pool layout of P={P} prompts (pool_cls * len_cls <= P, at most "
                         f"{MAX_POOL_ENTRIES} entries), got pool_cls={pool_cls}, len_cls={len_cls}, len_img={len_img}")
