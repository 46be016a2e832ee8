"""``PromptBank``: many TCPA tasks on one frozen backbone, a task per sample (docs/how-it-works.md, 'Prompt banks').

Each task is an adapter folder (or prompts file) that ``save_pretrained`` wrote for the same backbone: its pools,
keys and head. The bank holds every task's prompts, keys and head stacked, ``[.., T, ..]``; one forward takes images
and a task per sample. Its layers run the single-task kernels with a task index per sample: matching
reads each sample's key set and the attention each sample's prompt set in place (``Selection.tasks``), and the prompt
keys/values of every task and layer are one batched projection per forward. No prompt is copied per sample.

    bank = PromptBank(timm.create_model("vit_base_patch16_224", pretrained=True),
                      {"cifar100": "runs/cifar100", "dtd": "runs/dtd"})
    out = bank(images, ["dtd", "cifar100", ...])          # BankOutput: logits [B, K_max] (-inf padded), mask
    loss = bank.loss(out, labels)                         # training several tasks in one batch
    bank.save_pretrained({"dtd": "runs/dtd-2"})

The tasks share their mask semantics and prompt transform; their pool sizes, top-k and prompt lengths may differ (the
bank pads every pool to the largest, and each sample uses its own task's prompts only: ``Selection.layouts``), as
may their heads, and the kernel backend and prompt dropout (rate, per sample or not) they were saved with (the bank
takes its own); tasks with
an input prompter run it on their own images (``TaskInputPrompters``); the
backbone is a timm ``VisionTransformer`` or ``Eva`` (every block family whose prompt K/V are one batched
projection: ``Block``, ``ResPostBlock``, ``ParallelScalingBlock``, ``EvaBlock``, ``EvaBlockPostNorm``) or a Hugging
Face image classifier with a ``classifier`` (tested: ``ViTForImageClassification``,
``Dinov2ForImageClassification``), with one linear head, or an open_clip model or vision tower: it has no head (its
image embeddings are compared with class embeddings of the caller's), so its bank gives each sample's embedding,
``bank.features(images, tasks)``, and ``bank.matching_loss`` for training.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcpa_kernels._forward import BankCall, bank_forward, last_forward
from tcpa_kernels._patch import original_class
from tcpa_kernels._validate import MAX_POOL_ENTRIES, check_number, describe
from tcpa_kernels.checkpoint import PathLike, check_identity_of, model_identity, read_checkpoint, write_folder
from tcpa_kernels.integrations.input_prompter import ATTRIBUTE, InputPrompter, TaskInputPrompters, image_channels
from tcpa_kernels.integrations.models import model_family
from tcpa_kernels.ops.selection import task_one_hot
from tcpa_kernels.vit import apply_tcpa, find_model, remove_prompts, state_of

_POOL_NAMES = ("keys_cls", "keys_img", "prompts_cls", "prompts_img")
# what may differ between a bank's tasks (a Selection.layouts row: pools padded to the largest)
_LAYOUT_FIELDS = ("pool_size_cls", "pool_size_img", "topk_cls", "topk_img", "prompt_len_cls", "prompt_len_img")


class BankOutput(NamedTuple):
    """A bank forward's result: ``logits``, each sample's logits from its own task's head, ``[B, K_max]`` (K_max
    the most classes of a task in the bank), ``-inf`` past the sample's task's classes (softmax, argmax and cross
    entropy read it as is); ``tasks``: int64 ``[B]``, each sample's task number (the order of
    ``PromptBank.task_names``); ``mask``: bool ``[B, K_max]``, True on the sample's task's classes (made when
    read)."""

    logits: Tensor
    tasks: Tensor
    class_mask: Tensor  # the bank's [T, K_max]: True on each task's classes

    @property
    def mask(self) -> Tensor:
        return self.class_mask[self.tasks]


class BankFeatures(NamedTuple):
    """``PromptBank.features``' result: ``features`` ``[B, C]``, each sample's with its task's prompts: what the
    backbone's head reads (timm: the pre-logits; Hugging Face: the classifier's input; open_clip: ``encode_image``'s
    image embedding, or the tower's output); ``tasks``: int64 ``[B]``, each sample's task number."""

    features: Tensor
    tasks: Tensor


class _BankLayer(nn.Module):
    """One layer's key sets of every task: ``keys_cls [T, Pc, C]``, ``keys_img [T, Pi, C]`` (task t's are its
    single-task model's, in its first rows: pools of different sizes are padded with zeros to the largest)."""

    def __init__(self, keys_cls: Tensor, keys_img: Tensor):
        super().__init__()
        self.keys_cls = nn.Parameter(keys_cls)
        self.keys_img = nn.Parameter(keys_img)


class PromptBank(nn.Module):
    """TCPA tasks side by side on one frozen backbone (see the module docstring).

    Args:
        model: the plain backbone (timm or Hugging Face, see the module docstring; not yet prompted): the bank
            patches it with the tasks' largest pools and top-k (``apply_tcpa``) and holds it as ``bank.model``.
        tasks: task name -> adapter folder or prompts file saved by this library for this backbone
            (``save_pretrained`` / ``save_prompts``), at least one; TCPA, with one mask semantics and prompt
            transform for all (pool sizes, top-k and prompt lengths may differ, but not with Fourier prompts; the
            largest CLS pool and the largest image pool together at most 64 entries).
        check_identity: refuse a task saved for another backbone (``model_identity``), as ``from_pretrained``.
        backend: the kernels' backend, "auto" | "triton" | "torch" (whatever the tasks were saved with).
        prompt_dropout: the prompt dropout of the bank's training forwards; None: the tasks', which must then agree
            (a bank that only serves can take any, e.g. 0.0).
        prompt_dropout_per_sample: in training, one prompt-dropout mask per sample (the published code's; each
            sample's task's prompt K/V are then computed per sample, ``[B, 2, H, P, D]`` per layer, as a task's
            model alone computes them) or, False, one mask per task for the batch; None: the tasks', which must
            then agree.

    Parameters (they train; the backbone, and the prompt module ``apply_tcpa`` gave it, unused here, are frozen):
    ``prompts [L, T, P, C]``, every layer's prompt tokens of every task (CLS pool first; one tensor, so the forward
    gathers nothing and the backward accumulates one gradient), ``layers[i].keys_cls [T, Pc, C]`` and
    ``layers[i].keys_img [T, Pi, C]`` (Pc, Pi, P and the prompt lengths the largest task's; a smaller task's keys
    and prompts fill the first entries of each pool and the first tokens of each entry, zeros after, which it never
    reads and whose gradients are zero), ``head_weight [T, K_max, C]`` and ``head_bias [T, K_max]`` (task t's head
    in its first K_t rows, zeros after: every head in one GEMM; None on an open_clip backbone, which has no head),
    and ``input_prompters`` (``TaskInputPrompters``) when a task has an input prompter. Buffer ``task_layouts``:
    int64 ``[T, 6]``, each task's own (Pc, Pi, k_cls, k_img, Lc, Li) (also ``layouts``, a list), or None when all
    tasks have the same. Inputs are checked, and the model is left as it was on any error.
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, PathLike], *, check_identity: bool = True,
                 backend: str = "auto", prompt_dropout: float | None = None,
                 prompt_dropout_per_sample: bool | None = None):
        super().__init__()
        if not isinstance(tasks, Mapping) or not tasks or not all(isinstance(name, str) for name in tasks):
            raise ValueError(f"tasks: expected a non-empty mapping of task name (str) -> adapter folder or prompts "
                             f"file, got {tasks!r}")
        inner = find_model(model, prompted=False)
        if hasattr(inner, "prompt_state"):
            raise ValueError("model: expected the plain backbone (the bank adds the tasks' prompts itself), got a "
                             "model patched by apply_tcpa/apply_vpt; pass it through remove_prompts first")
        records = {name: read_checkpoint(path, f"tasks[{name!r}]") for name, path in tasks.items()}
        own = {"num_classes": None, "backend": backend, "input_prompter": False}  # the bank runs the prompters
        given = {"prompt_dropout": prompt_dropout, "prompt_dropout_per_sample": prompt_dropout_per_sample}
        own |= {name: value for name, value in given.items() if value is not None}
        config, layouts = _common_config(records, own)
        apply_tcpa(inner, **(config | own))
        try:
            _check_backbone(inner)
            loaded = [_task_tensors(inner, name, path, records[name], layout, check_identity)
                      for (name, path), layout in zip(tasks.items(), layouts)]
            site = _prompter_site(inner)
            prompters = [_task_prompter(inner, *site, name, records[name]) for name in tasks]
        except BaseException:
            remove_prompts(inner)
            raise
        state = state_of(inner)
        state.bank_only = True
        self._config = state.config  # the bank's dropout settings, read at each forward
        self.model = model
        self.task_names = list(tasks)
        self.records = {name: records[name][0] for name in tasks}  # what each task's file says of itself
        self.layouts = layouts  # each task's own (Pc, Pi, k_cls, k_img, Lc, Li)
        self.prompts = nn.Parameter(torch.stack([torch.stack([torch.cat([layer["prompts_cls"].flatten(0, 1),
                                                                         layer["prompts_img"].flatten(0, 1)])
                                                              for layer in layers]) for layers, _ in loaded], 1))
        differ = len(set(layouts)) > 1  # else every task's is the model's: no per-sample layout
        self.register_buffer("task_layouts", torch.tensor(layouts, device=self.prompts.device) if differ else None,
                             persistent=False)
        self.layers = nn.ModuleList(_BankLayer(*(torch.stack([layers[i][n] for layers, _ in loaded])
                                                 for n in ("keys_cls", "keys_img")))
                                    for i in range(len(state.blocks)))
        self._stack_heads([head for _, head in loaded])
        # the tasks' input prompters (None: no task has one), run on each sample's image before the backbone
        self.input_prompters = None if not any(prompters) else TaskInputPrompters(prompters)
        for module in (*(blk.tcpa for blk in state.blocks), *(getattr(inner, n) for n in state.original_heads)):
            module.requires_grad_(False)  # the backbone's own prompts and head: not used by the bank

    def _stack_heads(self, heads: list[tuple[Tensor, Tensor] | None]) -> None:
        """``head_weight``, ``head_bias``, ``class_mask`` and ``class_pad`` of the tasks' heads ((weight [K_t, C],
        bias [K_t]) each), or all None for a backbone without heads (open_clip)."""
        if heads[0] is None:
            self.head_weight = self.head_bias = self.class_mask = self.class_pad = None
            return
        classes = [weight.shape[0] for weight, _ in heads]
        pad = [max(classes) - k for k in classes]
        self.head_weight = nn.Parameter(torch.stack([F.pad(w, (0, 0, 0, n)) for (w, _), n in zip(heads, pad)]))
        self.head_bias = nn.Parameter(torch.stack([F.pad(b, (0, n)) for (_, b), n in zip(heads, pad)]))
        mask = torch.arange(max(classes)) < torch.tensor(classes)[:, None]  # [T, K_max]: each task's classes
        self.register_buffer("class_mask", mask.to(self.head_bias.device), persistent=False)
        self.register_buffer("class_pad", self.head_bias.new_zeros(mask.shape).masked_fill(~self.class_mask, -math.inf),
                             persistent=False)  # added to the heads' bias: -inf past each task's classes

    def task_index(self, tasks: Sequence[str] | Tensor, batch_size: int, device: torch.device) -> Tensor:
        """Each sample's task as int64 ``[B]`` on ``device``: from task names, or an integer tensor of task numbers
        (the order of ``task_names``) checked to be in range: read back in eager mode (a sync), while compiling by
        an assertion on the device (no sync, so the step can be one graph, CUDA graphs included)."""
        if isinstance(tasks, Tensor):
            if tasks.dtype not in (torch.int32, torch.int64) or tasks.shape != (batch_size,):
                raise ValueError(f"tasks: expected task names or an int32/int64 tensor [{batch_size}] of task numbers, "
                                 f"got {describe(tasks)}")
            T = len(self.task_names)
            if torch.compiler.is_compiling():
                torch._assert_async(((tasks >= 0) & (tasks < T)).all(), f"tasks: expected task numbers in [0, {T})")
            elif batch_size:
                low, high = torch.stack(torch.aminmax(tasks)).tolist()  # one read-back
                if not (0 <= low and high < T):
                    raise ValueError(f"tasks: expected task numbers in [0, {T}), got [{low}, {high}]")
            return tasks.to(device=device, dtype=torch.int64)
        return torch.tensor(self._task_numbers(tasks, batch_size)).to(device)

    def _task_numbers(self, tasks: Sequence[str], batch_size: int) -> list[int]:
        """Each sample's task number from its task's name; ValueError naming ``tasks`` for unknown names."""
        if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) != batch_size:
            raise ValueError(f"tasks: expected one task name per sample ({batch_size}), got {tasks!r}")
        numbers = {name: i for i, name in enumerate(self.task_names)}
        unknown = sorted({t for t in tasks if t not in numbers}, key=str)
        if unknown:
            raise ValueError(f"tasks: unknown task(s) {unknown}; the bank holds {self.task_names}")
        return [numbers[t] for t in tasks]

    def forward(self, images: Tensor, tasks: Sequence[str] | Tensor) -> BankOutput:
        """Each sample's logits from its task's prompts and head: images ``[B, 3, H, W]``, tasks one per sample."""
        if self.head_weight is None:
            raise ValueError(f"model: {original_class(find_model(self.model)).__name__} has no classification head to "
                             f"stack (open_clip: image embeddings); call bank.features(images, tasks) and compare "
                             f"each sample's with its task's class embeddings")
        features, index = self.features(images, tasks)  # [B, C]
        T, K = self.class_mask.shape
        logits = F.linear(features, self.head_weight.flatten(0, 1), (self.head_bias + self.class_pad).flatten())
        # [B, K]: each sample's task's K logits of the [B, T, K] every head gave
        logits = logits.view(-1, T, K).gather(1, index[:, None, None].expand(-1, 1, K)).squeeze(1)
        return BankOutput(logits, index, self.class_mask)

    def features(self, images: Tensor, tasks: Sequence[str] | Tensor) -> BankFeatures:
        """Each sample's features (``BankFeatures``) from its task's prompts: images ``[B, 3, H, W]``, tasks one per
        sample. The only forward of a bank without heads (open_clip); ``matching_loss`` takes its result too."""
        config = self._config
        per_sample = config.prompt_dropout_per_sample and self.training and config.prompt_dropout > 0
        call = self._call(tasks, images.shape[0], images.device, per_sample)
        if self.input_prompters is not None:  # as the patch embedding of each task's model alone runs its own
            images = self.input_prompters(images, call.tasks)
        with bank_forward(call):
            return BankFeatures(_features(find_model(self.model), images, self.head_weight is None), call.tasks)

    def _call(self, tasks: Sequence[str] | Tensor, batch_size: int, device: torch.device,
              per_sample: bool) -> BankCall:
        """The forward's bank call. Task names are known on the host: the forward computes the prompt K/V of the
        batch's tasks only (a batch of few tasks from a large bank does not pay for the others), and the task
        numbers, those tasks, each sample's row among them and (tasks of different pools) each sample's own pools
        reach the device in one copy. Task numbers in a tensor would need a sync to read: every task's K/V, the
        pools gathered on the device. ``per_sample`` (a prompt-dropout mask per sample): each sample's task's
        prompts, K/V per sample."""
        if isinstance(tasks, Tensor):
            index = self.task_index(tasks, batch_size, device)
            layouts = None if self.task_layouts is None else self.task_layouts[index]  # [B, 6]
            return BankCall(index, list(self.layers), self.prompts, index if per_sample else None, layouts=layouts,
                            per_sample=per_sample)
        numbers = self._task_numbers(tasks, batch_size)
        present = sorted(set(numbers))
        every = per_sample or len(present) == len(self.task_names)  # no subset of the tasks to project
        row = {task: i for i, task in enumerate(present)}  # a task's row among the present ones
        parts = [numbers] + ([] if every else [present, [row[t] for t in numbers]])
        if self.task_layouts is not None:
            parts.append([value for t in numbers for value in self.layouts[t]])
        flat = torch.tensor([v for part in parts for v in part]).to(device)
        packed = flat.split_with_sizes(list(map(len, parts))) if len(parts) > 1 else (flat,)
        layouts = None if self.task_layouts is None else packed[-1].view(batch_size, len(_LAYOUT_FIELDS))
        present, rows = (packed[0] if per_sample else None, None) if every else packed[1:3]
        return BankCall(packed[0], list(self.layers), self.prompts, present, rows, layouts=layouts,
                        per_sample=per_sample)

    def matching_loss(self, output: BankOutput | BankFeatures) -> Tensor:
        """The sum over the tasks of the forward that gave ``output`` (the last one) of each task's matching loss
        as its model alone would compute it on its samples (the loss terms weighted by the task's own sample count,
        not the batch's); 0 before a forward."""
        terms = self._per_sample_terms()
        if terms is None:
            return self.prompts.new_zeros((), dtype=torch.float32)
        return (terms * (terms.shape[0] * self._sample_weights(output.tasks, terms.dtype))).sum()

    def _per_sample_terms(self) -> Tensor | None:
        """Every layer's matching-loss terms of each sample of the last forward, summed: [B] (None: none)."""
        record = last_forward(state_of(find_model(self.model)))
        return None if record is None or not record.terms else torch.stack(list(record.terms.values())).sum((0, 2))

    def _sample_weights(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """[B]: 1 / the number of samples of the sample's task, in ``dtype``, from the tasks' one-hot matrix (which
        the backward reduces by too: ``selection.task_one_hot``)."""
        counts = task_one_hot(index, len(self.task_names), dtype).sum(1)  # [T]
        return counts[index].reciprocal()

    def loss(self, output: BankOutput, labels: Tensor, matching_weight: float = 0.01) -> Tensor:
        """Training several tasks in one batch: the sum over the batch's tasks of (the task's mean cross entropy on
        its samples + ``matching_weight`` x its matching loss), so each task gets the gradients its model alone
        would get from its samples. ``output``: the last forward's; ``labels`` [B]: each sample's class in its
        task."""
        check_number("matching_weight", matching_weight, lo=0.0, hi=float("inf"))
        if not isinstance(output, BankOutput):
            raise TypeError(f"output: expected the BankOutput of bank(images, tasks), got {type(output).__name__}; "
                            f"features take a loss of the caller's plus bank.matching_loss(output)")
        per_sample = F.cross_entropy(output.logits, labels, reduction="none")  # [B]
        terms = self._per_sample_terms()
        if terms is not None:  # the terms' weights 1 / B become the task's 1 / B_t, with the cross entropy's
            per_sample = per_sample + (matching_weight * per_sample.shape[0]) * terms
        return torch.dot(per_sample, self._sample_weights(output.tasks, per_sample.dtype))

    def save_pretrained(self, dirs: Mapping[str, PathLike]) -> None:
        """Write each named task to its own adapter folder (``save_pretrained``'s format: ``from_pretrained`` loads it
        into the backbone alone, ``PromptBank`` into a bank)."""
        unknown = sorted(set(dirs) - set(self.task_names))
        if unknown:
            raise ValueError(f"dirs: unknown task(s) {unknown}; the bank holds {self.task_names}")
        inner = find_model(self.model)
        blocks = state_of(inner).blocks
        names, site = pool_names(inner), _prompter_site(inner)[0]
        for name, folder in dirs.items():
            t = self.task_names.index(name)
            own_cls, own_img, _, _, own_len_cls, own_len_img = self.layouts[t]
            tensors = {}
            for i, (blk, layer) in enumerate(zip(blocks, self.layers)):
                cls_shape, img_shape = blk.tcpa.prompts_cls.shape, blk.tcpa.prompts_img.shape  # the padded pools
                cls, img = self.prompts[i, t].split_with_sizes((cls_shape[:2].numel(), img_shape[:2].numel()))
                tensors |= {names[i]["keys_cls"]: layer.keys_cls[t, :own_cls],
                            names[i]["keys_img"]: layer.keys_img[t, :own_img],
                            names[i]["prompts_cls"]: cls.view(cls_shape)[:own_cls, :own_len_cls],
                            names[i]["prompts_img"]: img.view(img_shape)[:own_img, :own_len_img]}
            if self.head_weight is not None:
                head, classes = _head_name(inner), int(self.class_mask[t].sum())
                tensors |= {f"{head}.weight": self.head_weight[t, :classes],
                            f"{head}.bias": self.head_bias[t, :classes]}
            prompter = None if self.input_prompters is None else self.input_prompters.task(t)
            if prompter is not None:
                tensors |= {f"{site}.{ATTRIBUTE}.{n}": tensor for n, tensor in prompter.items()}
            record = self.records[name] | {"identity": model_identity(self.model)}
            write_folder(folder, record, tensors, arg=f"dirs[{name!r}]")


def _common_config(records: dict, own: dict) -> tuple[dict, list[tuple[int, ...]]]:
    """(the config the bank patches its backbone with, each task's own (Pc, Pi, k_cls, k_img, Lc, Li)): the tasks'
    config but the fields the bank sets itself (``own``: the head's class count, the backend, the input prompter,
    the prompt dropout settings when given), with the largest pools, top-k and prompt lengths of the tasks.
    ValueError naming the task and the field that differ (a pool size or prompt length, with Fourier prompts: their
    transform mixes a layer's prompt tokens, so padding would change it) and pools of more than 64 entries
    together."""
    first_name, (_, method, first, _) = next(iter(records.items()))
    sizes = () if first.get("prompt_transform") == "fourier" else (
        "pool_size_cls", "pool_size_img", "prompt_len_cls", "prompt_len_img")  # Fourier: no padding
    may_differ = {*own, "topk_cls", "topk_img", *sizes}
    for name, (_, method, config, _) in records.items():
        if method != "tcpa":
            raise ValueError(f"tasks[{name!r}]: expected TCPA prompts, got {method}")
        differ = [f"{k} {config[k]!r} (task {first_name!r}: {first[k]!r})" for k in config
                  if k not in may_differ and config[k] != first[k]]
        if differ:
            own_fields = [k for k in ("prompt_dropout", "prompt_dropout_per_sample") if any(
                d.startswith(f"{k} ") for d in differ)]
            hint = "".join(f"; pass {k}= to the bank" for k in own_fields)
            raise ValueError(f"tasks[{name!r}]: a bank's tasks share their mask semantics and prompt transform (and "
                             f"with Fourier prompts their pool sizes and prompt lengths), got {'; '.join(differ)}"
                             f"{hint}")
    layouts = [tuple(config[k] for k in _LAYOUT_FIELDS) for _, _, config, _ in records.values()]
    largest = dict(zip(_LAYOUT_FIELDS, map(max, zip(*layouts))))
    if largest["pool_size_cls"] + largest["pool_size_img"] > MAX_POOL_ENTRIES:
        raise ValueError(f"tasks: the bank pads every task's pools to the largest CLS pool and the largest image pool, "
                         f"at most {MAX_POOL_ENTRIES} entries together, got {largest['pool_size_cls']} + "
                         f"{largest['pool_size_img']} (pools {dict(zip(records, layouts))})")
    return first | largest, layouts


def _is_timm(inner: nn.Module) -> bool:
    return "timm" in original_class(inner).__module__.split(".")


def _head_name(inner: nn.Module) -> str:
    """The name of the backbone's one classification head (timm ``head``, Hugging Face ``classifier``)."""
    return next(iter(state_of(inner).original_heads))


def pool_names(inner: nn.Module) -> list[dict[str, str]]:
    """Per layer, each pool parameter's name in the patched backbone (what its prompts files call it: timm
    ``blocks.{i}.tcpa.keys_cls``, Hugging Face ``vit.encoder.layer.{i}.tcpa.keys_cls``, ...)."""
    names = {id(p): name for name, p in inner.named_parameters()}
    return [{n: names[id(getattr(blk.tcpa, n))] for n in _POOL_NAMES} for blk in state_of(inner).blocks]


def _headless(inner: nn.Module) -> bool:
    """An open_clip model or vision tower: image embeddings, no classification head (its family has none)."""
    return not model_family(inner).heads


def _check_backbone(inner: nn.Module) -> None:
    """A timm model (``forward_head``) or a Hugging Face image classifier with one linear head, or an open_clip
    model or tower (no head), whose every block has its prompt K/V batched with the others' (``KVProjection``): the
    one pass that gives every task's K/V. Else ValueError naming what is not."""
    state = state_of(inner)
    own = sorted({original_class(blk).__name__ for blk, p in zip(state.blocks, state.projections) if p is None})
    heads = [getattr(inner, name) for name in state.original_heads]
    if _headless(inner):
        heads_ok = True
    else:
        model_ok = hasattr(inner, "forward_head") if _is_timm(inner) else "classifier" in state.original_heads
        heads_ok = model_ok and len(heads) == 1 and isinstance(heads[0], nn.Linear)
    if own or not heads_ok:
        raise ValueError(f"model: a prompt bank runs on a timm VisionTransformer or Eva, or a Hugging Face image "
                         f"classifier, with one linear head, or an open_clip model, with blocks whose prompt K/V are "
                         f"one batched projection (not ParallelThingsBlock), got {original_class(inner).__name__}"
                         f"{' with ' + ', '.join(own) if own else ''} and heads {sorted(state.original_heads)}")


def _features(inner: nn.Module, images: Tensor, headless: bool) -> Tensor:
    """[B, C]: what the backbone's head reads. timm: ``forward_head(..., pre_logits=True)``; ``headless`` (open_clip,
    ``_headless``): a CLIP model's ``encode_image``, a tower's output; Hugging Face: the model's own forward, its
    ``classifier`` returning its input for this call (a forward hook)."""
    if headless:
        return inner.encode_image(images) if hasattr(inner, "encode_image") else inner(images)
    if _is_timm(inner):
        return inner.forward_head(inner.forward_features(images), pre_logits=True)
    hook = inner.classifier.register_forward_hook(lambda module, args, out: args[0])
    try:
        return inner(pixel_values=images).logits
    finally:
        hook.remove()


def _task_tensors(inner: nn.Module, name: str, path: PathLike, record: tuple, layout: tuple[int, ...],
                  check_identity: bool):
    """(per layer {pool name: tensor}, (head weight [K, C], head bias [K]) or None for a backbone without heads)
    of one task, checked against the
    patched backbone: every pool tensor of the task's own pool size and prompt length (``layout``: (Pc, Pi, k_cls,
    k_img, Lc, Li)) and the backbone's width, padded with zeros to the backbone's (the largest) pools; a head over
    its width; ValueError naming the task."""
    meta, _, config, tensors = record
    arg = f"tasks[{name!r}]"
    if check_identity and "identity" in meta:
        check_identity_of(meta["identity"], inner, arg, path)
    state = state_of(inner)
    pool_cls, pool_img, _, _, len_cls, len_img = layout
    own_sizes = dict(keys_cls=(pool_cls,), prompts_cls=(pool_cls, len_cls), keys_img=(pool_img,),
                     prompts_img=(pool_img, len_img))  # the leading dims of each tensor that are the task's own
    layers = []
    for blk, names in zip(state.blocks, pool_names(inner)):
        pools = {n: tensors.get(names[n]) for n in _POOL_NAMES}
        for n, t in pools.items():
            padded = getattr(blk.tcpa, n)
            expected = (*own_sizes[n], *padded.shape[len(own_sizes[n]):])
            if t is None or t.shape != expected:
                raise ValueError(f"{arg}: {names[n]}: expected shape {expected}, got "
                                 f"{None if t is None else tuple(t.shape)}")
        layers.append({n: _pad(t.to(getattr(blk.tcpa, n)), getattr(blk.tcpa, n).shape) for n, t in pools.items()})
    if _headless(inner):
        return layers, None
    head = [tensors.get(f"{_head_name(inner)}.{p}") for p in ("weight", "bias")]
    width = getattr(inner, _head_name(inner)).in_features  # what the head reads: C, or 2C (Dinov2's CLS + mean)
    if head[0] is None or head[1] is None or head[0].dim() != 2 or head[0].shape[1] != width or \
            head[1].shape != head[0].shape[:1]:
        raise ValueError(f"{arg}: expected a head (weight [K, {width}], bias [K]), got "
                         f"{[None if t is None else tuple(t.shape) for t in head]}")
    reference = state.blocks[0].tcpa.keys_cls  # the backbone's device and dtype
    return layers, (head[0].to(reference), head[1].to(reference))


def _pad(t: Tensor, shape: torch.Size) -> Tensor:
    """t with zeros after its own entries (and tokens) up to ``shape``."""
    if t.shape == shape:
        return t
    padded = t.new_zeros(shape)
    padded[tuple(slice(0, n) for n in t.shape)] = t
    return padded


def _prompter_site(inner: nn.Module) -> tuple[str, nn.Module | None]:
    """(name, module) of the module an input prompter runs before: the model family's patch embedding ('', None:
    none)."""
    site = model_family(inner).patch_embedding(inner)
    return next((name for name, module in inner.named_modules() if module is site), ""), site


def _task_prompter(inner: nn.Module, site: str, module: nn.Module | None, name: str,
                   record: tuple) -> dict[str, Tensor] | None:
    """A task's input prompter tensors by name (``InputPrompter``'s; ``site``, ``module``: ``_prompter_site``),
    checked against the backbone's image channels, or None for a task saved without one; ValueError naming the
    task."""
    _, _, config, tensors = record
    if not config.get("input_prompter"):
        return None
    if module is None:
        raise ValueError(f"tasks[{name!r}]: input_prompter=True, but the backbone has no patch embedding to run it "
                         "before")
    channels = image_channels(module)
    expected = {n: p.shape for n, p in InputPrompter(channels, 3 * channels).named_parameters()}
    found = {n: tensors.get(f"{site}.{ATTRIBUTE}.{n}") for n in expected}
    if any(t is None or t.shape != expected[n] for n, t in found.items()):
        raise ValueError(f"tasks[{name!r}]: expected its input prompter {site}.{ATTRIBUTE}.* of shapes "
                         f"{ {n: tuple(s) for n, s in expected.items()} }, got "
                         f"{ {n: None if t is None else tuple(t.shape) for n, t in found.items()} }")
    reference = state_of(inner).blocks[0].tcpa.keys_cls  # the backbone's device and dtype
    return {n: t.to(reference) for n, t in found.items()}
