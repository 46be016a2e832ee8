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


def _topk_bits_torch(scores, num_prefix_tokens, pool_cls, k_cls, k_img, layouts=None):
    """Torch twin of the kernel. scores [B, N, E] -> bits int64 [B, N] (NaN ranks as -inf). ``layouts`` (int [B, 6]
    or None): each sample's own pools inside the padded ones (``Selection.layouts``): its rows choose among its own
    entries, its own k of them."""
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    E = scores.shape[-1]
    weights = torch.ones(E, dtype=torch.int64, device=scores.device)
    weights = torch.bitwise_left_shift(weights, torch.arange(E, device=scores.device))
    bits = torch.empty(scores.shape[:2], dtype=torch.int64, device=scores.device)
    groups = ((slice(0, num_prefix_tokens), slice(0, pool_cls), k_cls, 0),
              (slice(num_prefix_tokens, None), slice(pool_cls, None), k_img, 1))
    for tokens, entries, k, column in groups:
        s = scores[:, tokens, entries]
        picked = weights[entries]
        if layouts is None:
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
            bits[:, tokens] = picked[order].sum(-1)  # distinct powers of two: sum == or
            continue
        own = torch.arange(s.shape[-1], device=s.device) < layouts[:, column, None]  # [B, pool]: the sample's own
        s = s.masked_fill(~own[:, None], float("-inf"))  # ranked below its own entries (ties: lower index first)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        kept = torch.arange(order.shape[-1], device=s.device) < layouts[:, 2 + column, None, None]  # its own k
        bits[:, tokens] = torch.where(kept, picked[order], 0).sum(-1)
    return bits


def max_topk(num_tokens, num_prefix_tokens, k_cls, k_img):
    """The largest k any row of the sequence uses (the kernels' loop count)."""
    return max(k_cls if num_prefix_tokens > 0 else 0, k_img if num_tokens > num_prefix_tokens else 0)


def topk_bits(scores, *, num_prefix_tokens, pool_cls, k_cls, k_img, backend, layouts=None):
    """Per-token selection words from matching scores.

    scores: [B, N, pool_cls + pool_img]; prefix tokens (the first ``num_prefix_tokens``) choose their
    top ``k_cls`` among the first ``pool_cls`` columns, patch tokens their top ``k_img`` among the rest; with
    ``layouts`` (int [B, 6], ``Selection.layouts``) each sample's rows among its own entries, its own k of them.
    returns int64 [B, N]. Selection is not differentiable. fp64 scores take the torch twin on either backend: the
    kernel ranks on an int32 key of the fp32 value, so fp64 scores closer than fp32's resolution would tie there.
    """
    if backend == "torch" or scores.dtype == torch.float64:
        return _topk_bits_torch(scores.detach(), num_prefix_tokens, pool_cls, k_cls, k_img, layouts)
    return kernels("_selection_kernels").topk_bits(scores.detach(), num_prefix_tokens, pool_cls, k_cls, k_img,
                                                   layouts)


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
    the kernels read it in place, no per-sample copy is made. With ``layouts`` (int32 or int64 [B, 6]: each
    sample's ``(pool_cls, pool_img, k_cls, k_img, len_cls, len_img)``, a bank of tasks whose pools differ, padded to
    the largest pools and prompt lengths) sample b's CLS pool is entries ``[0, layouts[b, 0])`` of the padded one,
    each entry's first ``layouts[b, 4]`` prompt tokens, and its image pool the first ``layouts[b, 1]`` image
    entries, each entry's first ``layouts[b, 5]`` tokens: the other prompts do not exist for it (not even in the
    softmax's normaliser). Matching reads the first four columns.
    """

    mask: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    pool_cls: int = 0
    len_cls: int = 1
    len_img: int = 1
    tasks: torch.Tensor | None = None
    layouts: torch.Tensor | None = None

    def op_args(self) -> tuple:
        """``(mask, bits, tasks, layouts, pool_cls, len_cls, len_img)``: a Selection as the custom ops take it (one
        of mask / bits is None; tasks and layouts None without a bank); the launchers take it so too."""
        return self.mask, self.bits, self.tasks, self.layouts, self.pool_cls, self.len_cls, self.len_img

    def rows(self, start, end, num_prompts):
        """bool [B, end-start, P] for query tokens start..end-1 (torch backend, one chunk at a time)."""
        if self.mask is not None:
            return self.mask[:, start:end]
        n_cls = self.pool_cls * self.len_cls
        p = torch.arange(num_prompts, device=self.bits.device)
        entry = torch.where(p < n_cls, p // self.len_cls, self.pool_cls + (p - n_cls) // self.len_img)
        rows = (torch.bitwise_right_shift(self.bits[:, start:end, None], entry) & 1).bool()
        return rows if self.layouts is None else rows & self.live(num_prompts)

    def live(self, num_prompts):
        """bool [B, 1, P]: the prompts each sample has (``layouts``), or None (all of them)."""
        if self.layouts is None:
            return None
        n_cls = self.pool_cls * self.len_cls
        p = torch.arange(num_prompts, device=self.layouts.device)
        is_cls = p < n_cls
        q = torch.where(is_cls, p, p - n_cls)  # the prompt's index in its pool
        length = torch.where(is_cls, self.len_cls, self.len_img)  # the padded pool's tokens per entry
        own = self.layouts[:, None]  # [B, 1, 6]
        own_entries = torch.where(is_cls, own[..., 0], own[..., 1])  # [B, P]
        own_length = torch.where(is_cls, own[..., 4], own[..., 5])
        return ((q // length < own_entries) & (q % length < own_length))[:, None]


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
    return torch.mm(task_one_hot(tasks, num_tasks, values.dtype), values.flatten(1)).view(num_tasks, *values.shape[1:])


def check_tasks(tasks, B, T, device) -> None:
    """ValueError/TypeError unless ``tasks`` is an int32 or int64 [B] tensor on device with values in [0, T) (read
    back from the device: a sync, which the checked entries afford and the model path skips)."""
    check_tensor("selection.tasks", tasks, ndim=1, dtypes=(torch.int32, torch.int64))
    if tasks.device != device or tuple(tasks.shape) != (B,):
        raise ValueError(f"selection.tasks: expected int32/int64 shape {(B,)} on {device}, got {describe(tasks)}")
    if B and not (0 <= int(tasks.min()) and int(tasks.max()) < T):
        raise ValueError(f"selection.tasks: expected values in [0, {T}) (the prompt sets of the bank), got "
                         f"[{int(tasks.min())}, {int(tasks.max())}]")


def check_layouts(layouts, B, pools, topk, lengths, device, name="layouts") -> None:
    """ValueError/TypeError unless ``layouts`` (``Selection.layouts``) is an int32 or int64 [B, 6] tensor on device
    whose rows are pools inside the padded ``pools`` (pool_cls, pool_img), each at least one entry, choosing
    1..(its pool size) entries, at most ``topk`` (k_cls, k_img, the kernels' bound; None: the attention, which
    reads the pools only), entries of 1..``lengths`` (len_cls, len_img) tokens (None: matching, which does not read
    them) (read back from the device: a sync, which the checked entries afford and the model path skips)."""
    check_tensor(name, layouts, ndim=2, dtypes=(torch.int32, torch.int64))
    if layouts.device != device or tuple(layouts.shape) != (B, 6):
        raise ValueError(f"{name}: expected int32/int64 shape {(B, 6)} on {device}, got {describe(layouts)}")
    if not layouts.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (the kernels read rows of 6), got strides "
                         f"{layouts.stride()}")
    bounds = (*pools, *(topk or pools), *(lengths or ()))
    for column, (field, bound) in enumerate(zip(("pool_cls", "pool_img", "k_cls", "k_img", "len_cls", "len_img"),
                                                bounds)):
        values = layouts[:, column]
        upper = layouts[:, column - 2].clamp(max=bound) if field.startswith("k_") else bound  # a k: its pool too
        if B and not bool(((values >= 1) & (values <= upper)).all()):
            raise ValueError(f"{name}: expected each sample's {field} in [1, {bound}]"
                             f"{', at most its pool' if field.startswith('k_') else ''}, got [{int(values.min())}, "
                             f"{int(values.max())}]")


def check_selection(selection, B, N, P, device) -> None:
    """ValueError/TypeError unless ``selection`` is a Selection for B x N query tokens and P prompts on device (its
    tasks are checked with the prompts: ``check_tasks``)."""
    if not isinstance(selection, Selection):
        raise TypeError(f"selection: expected a tcpa_kernels.ops.selection.Selection, got {type(selection).__name__}")
    if selection.mask is not None:
        if selection.layouts is not None:
            raise ValueError("selection.layouts: per-sample pool layouts come with selection words (bits), got a "
                             "mask (which says per prompt what each token uses)")
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
    if selection.layouts is not None:
        check_layouts(selection.layouts, B, (pool_cls, (P - n_cls) // len_img), None, (len_cls, len_img), device,
                      "selection.layouts")
