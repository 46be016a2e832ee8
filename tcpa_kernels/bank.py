"""``PromptBank``: many TCPA tasks on one frozen backbone, a task per sample (docs/how-it-works.md, 'Prompt banks').

Each task is an adapter folder (or prompts file) that ``save_pretrained`` wrote for the same backbone: its pools,
keys and head. The bank holds every task's pools and keys stacked per layer, ``[T, ...]``, and its heads; one forward
takes images and a task per sample. Its layers run the single-task kernels with a task index per sample: matching
reads each sample's key set and the attention each sample's prompt set in place (``Selection.tasks``), and the prompt
keys/values of every task and layer are one batched projection per forward. No prompt is copied per sample.

    bank = PromptBank(timm.create_model("vit_base_patch16_224", pretrained=True),
                      {"cifar100": "runs/cifar100", "dtd": "runs/dtd"})
    out = bank(images, ["dtd", "cifar100", ...])          # BankOutput: logits [B, K_max] (-inf padded), mask
    loss = bank.loss(out, labels, ["dtd", "cifar100", ...])  # training several tasks in one batch
    bank.save_pretrained({"dtd": "runs/dtd-2"})

The tasks share one pool layout (the configs may differ in the head only) and a timm ``VisionTransformer`` with
``Block`` blocks is the backbone (other families: one model per task for now).
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcpa_kernels._forward import BankCall, bank_forward, last_forward
from tcpa_kernels._validate import check_number, describe
from tcpa_kernels.checkpoint import PathLike, check_identity_of, model_identity, read_checkpoint, write_folder
from tcpa_kernels.integrations.timm_vit import TCPAMixin
from tcpa_kernels.vit import apply_tcpa, find_model, remove_prompts, state_of

_POOL_NAMES = ("keys_cls", "keys_img", "prompts_cls", "prompts_img")
_FIXED_PER_BANK = ("prompt_dropout_per_sample", "input_prompter")  # options a bank does not run (True refused)


class BankOutput(NamedTuple):
    """A bank forward's result: each sample's logits from its own task's head, ``[B, K_max]`` (K_max the most
    classes of a task in the bank), ``-inf`` past the sample's task's classes (softmax, argmax and cross entropy
    read it as is); ``mask``: bool ``[B, K_max]``, True on the sample's task's classes."""

    logits: Tensor
    mask: Tensor


class _BankLayer(nn.Module):
    """One layer's pools of every task: ``keys_cls [T, Pc, C]``, ``keys_img [T, Pi, C]``, ``prompts_cls
    [T, Pc, Lc, C]``, ``prompts_img [T, Pi, Li, C]`` (task t's are its single-task model's)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for name in _POOL_NAMES:
            self.register_parameter(name, nn.Parameter(tensors[name]))


class PromptBank(nn.Module):
    """TCPA tasks side by side on one frozen backbone (see the module docstring).

    Args:
        model: the plain backbone (a timm ``VisionTransformer`` of ``Block`` blocks, not yet prompted): the bank
            patches it with the tasks' pool layout (``apply_tcpa``) and holds it as ``bank.model``.
        tasks: task name -> adapter folder or prompts file saved by this library for this backbone
            (``save_pretrained`` / ``save_prompts``), at least one; TCPA, one pool layout for all.
        check_identity: refuse a task saved for another backbone (``model_identity``), as ``from_pretrained``.

    The bank's parameters are its layers' stacked pools (``bank.layers[i]``) and its heads (``bank.heads[t]``, one
    ``nn.Linear`` per task); they train, the backbone (and the prompt module ``apply_tcpa`` gave it, unused here)
    is frozen. Inputs are checked and the model is left as it was on any error.
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, PathLike], *, check_identity: bool = True):
        super().__init__()
        if not isinstance(tasks, Mapping) or not tasks or not all(isinstance(name, str) for name in tasks):
            raise ValueError(f"tasks: expected a non-empty mapping of task name (str) -> adapter folder or prompts "
                             f"file, got {tasks!r}")
        inner = find_model(model, prompted=False)
        if hasattr(inner, "prompt_state"):
            raise ValueError("model: expected the plain backbone (the bank adds the tasks' prompts itself), got a "
                             "model patched by apply_tcpa/apply_vpt; pass it through remove_prompts first")
        records = {name: read_checkpoint(path, f"tasks[{name!r}]") for name, path in tasks.items()}
        config = _common_config(records)
        apply_tcpa(inner, **(config | {"num_classes": None}))
        try:
            _check_backbone(inner)
            tensors = {name: _task_tensors(inner, name, path, records[name], check_identity)
                       for name, path in tasks.items()}
        except BaseException:
            remove_prompts(inner)
            raise
        self.model = model
        self.task_names = list(tasks)
        self.records = {name: records[name][0] for name in tasks}  # what each task's file says of itself
        layers = range(len(state_of(inner).blocks))
        self.layers = nn.ModuleList(_BankLayer({n: torch.stack([tensors[t][0][i][n] for t in tasks])
                                                for n in _POOL_NAMES}) for i in layers)
        reference = state_of(inner).blocks[0].tcpa.keys_cls  # the device and dtype of the prompts
        self.heads = nn.ModuleList(_head(*(t.to(reference) for t in tensors[name][1])) for name in tasks)
        classes = [head.out_features for head in self.heads]
        self.max_classes = max(classes)
        self.register_buffer("class_offsets", torch.tensor([0, *classes[:-1]], device=reference.device).cumsum(0),
                             persistent=False)
        self.register_buffer("class_counts", torch.tensor(classes, device=reference.device), persistent=False)
        state = state_of(inner)
        for module in (*(blk.tcpa for blk in state.blocks), *(getattr(inner, n) for n in state.original_heads)):
            module.requires_grad_(False)  # the backbone's own prompts and head: not used by the bank

    def task_index(self, tasks: Sequence[str] | Tensor, batch_size: int, device: torch.device) -> Tensor:
        """Each sample's task as int32 ``[B]`` on ``device``: from task names, or an integer tensor of task numbers
        (the order of ``task_names``) checked to be in range."""
        if isinstance(tasks, Tensor):
            if tasks.dtype not in (torch.int32, torch.int64) or tasks.shape != (batch_size,):
                raise ValueError(f"tasks: expected task names or an int32/int64 tensor [{batch_size}] of task numbers, "
                                 f"got {describe(tasks)}")
            if batch_size and not (0 <= int(tasks.min()) and int(tasks.max()) < len(self.task_names)):
                raise ValueError(f"tasks: expected task numbers in [0, {len(self.task_names)}), got "
                                 f"[{int(tasks.min())}, {int(tasks.max())}]")
            return tasks.to(device=device, dtype=torch.int32)
        if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) != batch_size:
            raise ValueError(f"tasks: expected one task name per sample ({batch_size}), got {tasks!r}")
        numbers = {name: i for i, name in enumerate(self.task_names)}
        unknown = sorted({t for t in tasks if t not in numbers}, key=str)
        if unknown:
            raise ValueError(f"tasks: unknown task(s) {unknown}; the bank holds {self.task_names}")
        return torch.tensor([numbers[t] for t in tasks], dtype=torch.int32).to(device)

    def forward(self, images: Tensor, tasks: Sequence[str] | Tensor) -> BankOutput:
        """Each sample's logits from its task's prompts and head: images ``[B, 3, H, W]``, tasks one per sample."""
        index = self.task_index(tasks, images.shape[0], images.device)
        inner = find_model(self.model)
        with bank_forward(BankCall(index, self.layers)):
            features = inner.forward_head(inner.forward_features(images), pre_logits=True)  # [B, C]
        weight = torch.cat([head.weight for head in self.heads])  # [sum K, C]: every head, one GEMM
        bias = torch.cat([head.bias for head in self.heads])
        logits = F.linear(features, weight.to(features.dtype), bias.to(features.dtype))  # [B, sum K]
        classes = torch.arange(self.max_classes, device=logits.device)  # [K_max]
        mask = classes < self.class_counts[index][:, None]  # [B, K_max]
        columns = (self.class_offsets[index][:, None] + classes).clamp_max(logits.shape[1] - 1)
        return BankOutput(logits.gather(1, columns).masked_fill(~mask, float("-inf")), mask)

    def matching_loss(self, tasks: Sequence[str] | Tensor) -> Tensor:
        """The sum over the last forward's tasks (``tasks``: that forward's, one per sample) of each task's matching
        loss as its model alone would compute it on its samples (the loss terms weighted by the task's own sample
        count, not the batch's); 0 before a forward."""
        per_sample = self._per_sample_terms()
        if per_sample is None:
            return self.class_counts.new_zeros((), dtype=torch.float32)
        return self._matching_loss(per_sample, self.task_index(tasks, per_sample.shape[0], per_sample.device))

    def _per_sample_terms(self) -> Tensor | None:
        """Every layer's matching-loss terms of each sample of the last forward, summed: [B] (None: none)."""
        record = last_forward(state_of(find_model(self.model)))
        return None if record is None or not record.terms else torch.stack(list(record.terms.values())).sum((0, 2))

    def _matching_loss(self, per_sample: Tensor, index: Tensor) -> Tensor:
        """The terms reweighted from the batch's sample count to each sample's task's (the loss weights 1 / B)."""
        return (per_sample * (per_sample.shape[0] / _task_counts(index, len(self.task_names))[index])).sum()

    def loss(self, output: BankOutput, labels: Tensor, tasks: Sequence[str] | Tensor,
             matching_weight: float = 0.01) -> Tensor:
        """Training several tasks in one batch: the sum over the batch's tasks of (the task's mean cross entropy on
        its samples + ``matching_weight`` x its matching loss), so each task gets the gradients its model alone
        would get from its samples. ``labels`` [B]: each sample's class in its task."""
        check_number("matching_weight", matching_weight, lo=0.0, hi=float("inf"))
        index = self.task_index(tasks, output.logits.shape[0], output.logits.device)
        counts = _task_counts(index, len(self.task_names))[index]  # [B]: samples of each sample's task
        task_means = (F.cross_entropy(output.logits, labels, reduction="none") / counts).sum()
        per_sample = self._per_sample_terms()
        return task_means if per_sample is None else task_means + matching_weight * self._matching_loss(per_sample,
                                                                                                          index)

    def save_pretrained(self, dirs: Mapping[str, PathLike]) -> None:
        """Write each named task to its own adapter folder (``save_pretrained``'s format: ``from_pretrained`` loads it
        into the backbone alone, ``PromptBank`` into a bank)."""
        unknown = sorted(set(dirs) - set(self.task_names))
        if unknown:
            raise ValueError(f"dirs: unknown task(s) {unknown}; the bank holds {self.task_names}")
        for name, folder in dirs.items():
            t = self.task_names.index(name)
            tensors = {f"blocks.{i}.tcpa.{n}": getattr(layer, n)[t] for i, layer in enumerate(self.layers)
                       for n in _POOL_NAMES}
            tensors |= {"head.weight": self.heads[t].weight, "head.bias": self.heads[t].bias}
            record = self.records[name] | {"identity": model_identity(self.model)}
            write_folder(folder, record, tensors, arg=f"dirs[{name!r}]")


def _task_counts(index: Tensor, num_tasks: int) -> Tensor:
    """Samples per task [T] (fp32) of the task index [B] (a one-hot sum: a static shape, no host sync)."""
    tasks = torch.arange(num_tasks, dtype=index.dtype, device=index.device)
    return (tasks[:, None] == index[None, :]).sum(1).float()


def _common_config(records: dict) -> dict:
    """The pool layout every task shares (its config but the head's class count); ValueError naming the task and
    the field that differ, and anything a bank does not run."""
    first_name, (_, method, first, _) = next(iter(records.items()))
    for name, (_, method, config, _) in records.items():
        if method != "tcpa":
            raise ValueError(f"tasks[{name!r}]: expected TCPA prompts, got {method}")
        differ = [f"{k} {config[k]!r} (task {first_name!r}: {first[k]!r})" for k in config
                  if k != "num_classes" and config[k] != first[k]]
        if differ:
            raise ValueError(f"tasks[{name!r}]: a bank's tasks share one pool layout, got {'; '.join(differ)}")
        refused = [k for k in _FIXED_PER_BANK if config[k]]
        if refused:
            raise ValueError(f"tasks[{name!r}]: {', '.join(refused)}=True is not run by a prompt bank (one model per "
                             "task for now)")
    return first


def _check_backbone(inner: nn.Module) -> None:
    blocks = state_of(inner).blocks
    others = sorted({type(blk).__name__ for blk in blocks if not isinstance(blk, TCPAMixin)})
    if others or not hasattr(inner, "forward_head"):
        raise ValueError(f"model: a prompt bank runs on a timm VisionTransformer of Block blocks, got "
                         f"{type(inner).__name__} with {others or 'no forward_head'}")


def _task_tensors(inner: nn.Module, name: str, path: PathLike, record: tuple, check_identity: bool):
    """(per layer {pool name: tensor}, (head weight [K, C], head bias [K])) of one task, checked against the
    patched backbone: every pool tensor of its shape, a head over its width; ValueError naming the task."""
    meta, _, config, tensors = record
    arg = f"tasks[{name!r}]"
    if check_identity and "identity" in meta:
        check_identity_of(meta["identity"], inner, arg, path)
    state = state_of(inner)
    layers = []
    for i, blk in enumerate(state.blocks):
        pools = {n: tensors.get(f"blocks.{i}.tcpa.{n}") for n in _POOL_NAMES}
        for n, t in pools.items():
            expected = getattr(blk.tcpa, n)
            if t is None or t.shape != expected.shape:
                raise ValueError(f"{arg}: blocks.{i}.tcpa.{n}: expected shape {tuple(expected.shape)}, got "
                                 f"{None if t is None else tuple(t.shape)}")
        layers.append({n: t.to(getattr(blk.tcpa, n)) for n, t in pools.items()})
    head = [tensors.get(f"{next(iter(state.original_heads))}.{p}") for p in ("weight", "bias")]
    width = state.blocks[0].tcpa.keys_cls.shape[1]
    if head[0] is None or head[1] is None or head[0].dim() != 2 or head[0].shape[1] != width or \
            head[1].shape != head[0].shape[:1]:
        raise ValueError(f"{arg}: expected a head (weight [K, {width}], bias [K]), got "
                         f"{[None if t is None else tuple(t.shape) for t in head]}")
    return layers, (head[0], head[1])


def _head(weight: Tensor, bias: Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head

