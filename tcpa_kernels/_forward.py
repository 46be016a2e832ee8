"""One forward's prompt data (docs/how-it-works.md, 'Per-call data'): made by the first prompted block of a call, handed
from block to block with the hidden states, let go with them.

A forward of a prompted model needs data that belong to that call only: the prompt keys/values of every layer
(computed once for all layers from the parameters as they are at the call, ``_prompt_kv.py``), the matching-loss
terms of the layers that ran, and VPT-shallow's prompt tokens carried from one block to the next. None of it is
kept on a module:

- a prompted block whose input carries no forward of its model starts one, a :class:`PromptForward` (block 0 of a
  model forward; the first block of a staged model or of a block run alone), and makes it its thread's
  :class:`LastForward` of the model (``PromptState.last``), which ``get_matching_loss`` reads;
- each block hands the forward on by setting it on its output tensor (``_tcpa_forward``): the next block finds it
  there, and so does the block's own recomputation under gradient checkpointing, which calls the block again on the
  very input tensor it had. So two forwards before one backward, or a checkpointed block, use the K/V and dropout
  masks of the forward they belong to. The reference is strong while a backward may come (grad mode, an output that
  requires grad) and weak otherwise, so that features kept from an evaluation (``forward_intermediates``, hidden
  states) do not keep a forward's K/V alive. VPT-shallow's carried prompts ride on the output the same way
  (``_tcpa_carry``). FSDP2 hands each block it wraps a new tensor (its input passed through an autograd function):
  such a block continues the last forward this thread started on the model, unless its layer ran in it already;
- a block records its loss terms in the thread's ``LastForward`` when it belongs to that forward, never on the
  ``PromptForward``: the hidden states hold the latter, and a tensor of theirs held back would close a reference
  cycle through the autograd graph that Python's collector cannot see (a forward without a backward would leak);
- a block recomputed during a backward starts or extends nothing: it records no loss terms and no carried prompts,
  and a block that starts a forward there redraws its dropout masks from the random state checkpointing restored.

A prompt bank's forward (``bank.PromptBank``: many tasks' prompt sets on one backbone, a task per sample) runs the
model inside :func:`bank_forward`, a per-thread scope as autocast is: the forward a block starts there holds the
bank's call (each sample's task and the bank's per-layer parameters, :class:`BankCall`), and so do its blocks and
their recomputations, which read the forward from their input tensors.

Blocks whose attention is a module of its own (the model family's attention class, swapped) get what their layer
computed for this call through :func:`layer_call`, a per-thread scope around the block's own forward (as autocast is
a scope): the selection, the pre-attention norm of the input when the matching kernel computed it, the prompt K/V.
"""

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tcpa_kernels._patch import is_fully_sharded
from tcpa_kernels._prompt_kv import all_layers_kv
from tcpa_kernels.ops.selection import Selection

HANDLE = "_tcpa_forward"  # the tensor attribute that carries a PromptForward
RECORD = "_tcpa_record"  # the tensor attribute that carries (weakly) the forward's LastForward
CARRY = "_tcpa_carry"  # VPT-shallow: the tensor attribute that carries the previous block's prompt tokens' output


class LayerBank(NamedTuple):
    """One layer's part of a prompt bank's forward: its key sets, each sample's task and each sample's row of the
    forward's prompt sets."""

    keys_cls: Tensor  # [T, Pc, C]
    keys_img: Tensor  # [T, Pi, C]
    tasks: Tensor  # int [B], each in [0, T): the key set a sample matches
    prompt_tasks: Tensor | None  # int [B]: the row of the forward's prompt K/V ([T', 2, H, P, D]) a sample attends
    # to; None: the forward's prompt K/V are per sample ([B, 2, H, P, D], a prompt-dropout mask each)
    layouts: Tensor | None  # int [B, 6]: each sample's own pools, top-k, prompt lengths (``Selection.layouts``) or None


@dataclasses.dataclass(frozen=True)
class BankCall:
    """A prompt bank's forward: each sample's task (int [B]), per layer the bank's key sets (a list of modules
    with ``keys_cls [T, Pc, C]`` and ``keys_img [T, Pi, C]``), every layer's prompt tokens of every task (``prompts
    [L, T, P, C]``), and the tasks whose prompt K/V the forward computes: ``present`` (int [T'], the tasks of the
    batch, in order) with each sample's row among them (``prompt_tasks``), or None and the tasks themselves (every
    task's), or with ``per_sample`` (a prompt-dropout mask per sample) ``present`` the tasks themselves: each
    sample's task's prompts, K/V per sample; ``layouts``, each sample's own pool sizes and top-k inside the padded
    ones when the tasks' differ."""

    tasks: Tensor
    layers: Sequence
    prompts: Tensor
    present: Tensor | None = None
    prompt_tasks: Tensor | None = None
    layouts: Tensor | None = None
    per_sample: bool = False

    def layer(self, index: int) -> LayerBank:
        params = self.layers[index]._parameters  # a list and dict reads: a block asks at every call
        prompt_tasks = None if self.per_sample else self.tasks if self.prompt_tasks is None else self.prompt_tasks
        return LayerBank(params["keys_cls"], params["keys_img"], self.tasks, prompt_tasks, self.layouts)

    def prompt_sets(self) -> Tensor:
        """The prompt tokens whose K/V this forward computes: [L, T', P, C] (every task's: the parameter itself)."""
        return self.prompts if self.present is None else self.prompts.index_select(1, self.present)


_BANK = threading.local()


@contextlib.contextmanager
def bank_forward(call: BankCall) -> Iterator[None]:
    """Inside: a forward a prompted block starts belongs to the prompt bank's ``call``."""
    previous = getattr(_BANK, "call", None)
    _BANK.call = call
    try:
        yield
    finally:
        _BANK.call = previous


class PromptForward:
    """What the blocks of one forward of a prompted model share: every layer's prompt K/V. It holds ``owner``, its
    model's ``PromptState.token``, never the model, and no tensor whose graph runs through the hidden states (the
    loss terms live in the thread's ``LastForward``): the hidden states hold it, so anything of theirs it held would
    be a cycle through the autograd graph, which the garbage collector cannot see, kept until a backward."""

    def __init__(self, state):
        self.owner = state.token
        self.grad = torch.is_grad_enabled()  # made without autograd (evaluation, a no-grad stage): K/V carry no graph
        self.last_index = -1  # the highest layer index that ran in it
        self.kv: list | None = None  # per layer: prompt K/V ([2, H, P, D] or [B, 2, H, P, D]) or None (its own)
        self.bank: BankCall | None = getattr(_BANK, "call", None)  # a prompt bank's forward, or None
        if self.bank is None and state.bank_only:
            raise RuntimeError("model: a PromptBank's backbone runs inside the bank's forward only (its own prompt "
                               "modules are unused placeholders): call bank(images, tasks), or "
                               "tk.remove_prompts(bank.model) for the plain backbone")

    def prompt_kv(self, layer, batch_size: int) -> Tensor | None:
        """The prompt K/V ([2, H, P, D] or [B, 2, H, P, D]; a bank's [T, 2, H, P, D]) of ``layer`` (a ``_LayerRef``)
        from the model's one pass over all layers, made when the first block asks; None when the blocks project
        their own."""
        if self.kv is None:
            self.kv = all_layers_kv(layer.state, batch_size, self.bank)
        return self.kv[layer.index]

    def layer_bank(self, index: int) -> LayerBank | None:
        """Layer ``index``'s part of the bank's forward, or None outside a bank."""
        return None if self.bank is None else self.bank.layer(index)


class LastForward:
    """The last forward a thread started on a model (``PromptState.last.record``), with what it left for after it:
    the layers' matching-loss terms, and VPT-shallow's carried prompt tokens for blocks that FSDP2 hands a new
    input tensor."""

    def __init__(self, forward: PromptForward):
        self.forward = forward
        self.terms: dict[int, Tensor] = {}  # layer index -> matching-loss terms [B, N] of the layers that ran
        self.carry: dict[int, Tensor] = {}  # VPT-shallow: layer index -> its prompt tokens' output [B, P, C]
        self.loss: Tensor | None = None  # the sum of ``terms``, made once when asked for

    def matching_loss(self) -> Tensor | None:
        """Sum of the matching-loss terms of every layer that ran (None when none recorded any)."""
        if self.loss is None and self.terms:
            self.loss = sum_terms(list(self.terms.values()))
        return self.loss


def sum_terms(terms: list[Tensor]) -> Tensor:
    """The matching loss of layers' terms ([B, N] each): one stack + sum (one cat + sum where the layers' token
    counts differ)."""
    if len(terms) == 1:
        return terms[0].sum()
    if all(t.shape == terms[0].shape for t in terms):
        return torch.stack(terms).sum()
    return torch.cat([t.flatten() for t in terms]).sum()


def last_forward(state) -> LastForward | None:
    """The last forward this thread started on the model of ``state``."""
    return getattr(state.last, "record", None)


def _in_backward() -> bool:
    """Running inside the autograd engine (a checkpointed block being recomputed); never true while compiling."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def join_forward(x: Tensor, layer) -> tuple[PromptForward, LastForward | None]:
    """(the forward the block input ``x`` of layer ``layer`` (a ``_LayerRef``) belongs to, where this call records
    what outlives it: that forward's ``LastForward``, or None during a recomputation and for a forward another one
    of this thread has followed).

    The forward x carries, else, for a block FSDP2 wraps (it hands each block a new tensor, its input passed through
    an autograd function), the last forward this thread started on the model; it is continued if this layer has not
    run in it yet (a recomputed block joins the forward it belongs to). Otherwise a new forward starts; also when a
    forward run without autograd would continue with autograd: its K/V have no graph (a staged model's no-grad first
    stage), and tensors made under inference_mode must not reach autograd. The record comes with x too (weakly: the
    thread's ``PromptState.last`` owns it), so no block reads another block's side effects (dynamo's checkpoint
    cannot trace that)."""
    state = layer.state
    fwd, record = getattr(x, HANDLE, None), getattr(x, RECORD, None)
    if type(fwd) is weakref.ref:  # (inline: a block pays each call)
        fwd = fwd()
    if record is not None:  # always a weak reference
        record = record()
    replay = _in_backward()
    if fwd is None and not (replay or torch.compiler.is_compiling()) and is_fully_sharded(state.blocks[layer.index]):
        record = last_forward(state)
        fwd = None if record is None else record.forward
    if (fwd is None or fwd.owner is not state.token or (torch.is_grad_enabled() and not fwd.grad)
            or (layer.index <= fwd.last_index and not replay)):  # this layer ran in it already: a new forward
        fwd = PromptForward(state)
        record = None if replay else LastForward(fwd)
        if record is not None:
            state.last.record = record
    fwd.last_index = max(fwd.last_index, layer.index)
    return fwd, None if replay or record is None or record.forward is not fwd else record


def hand_on(out: Tensor, fwd: PromptForward, record: LastForward | None) -> Tensor:
    """``out`` (a block's output) carrying ``fwd`` and ``record`` for the next block and for recomputation."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and out.requires_grad):
        setattr(out, HANDLE, fwd)
    else:
        setattr(out, HANDLE, weakref.ref(fwd))
    if record is not None:
        setattr(out, RECORD, weakref.ref(record))
    return out


def record_terms(record: LastForward | None, index: int, terms: Tensor | None) -> None:
    """Layer ``index``'s matching-loss terms [B, N] into the forward's record (nothing without one)."""
    if record is not None and terms is not None:
        record.terms[index] = terms
        record.loss = None


def carried_prompts(record: LastForward | None, x: Tensor, index: int) -> Tensor | None:
    """VPT-shallow: the prompt tokens' output of block ``index - 1`` of this forward, carried on x (also when a
    checkpointed block is recomputed: it gets the very x it had), else recorded for a block FSDP2 hands a new x."""
    carried = getattr(x, CARRY, None)
    if carried is None and record is not None:
        carried = record.carry.get(index - 1)
    return carried


def carry_on(out: Tensor, prompts_out: Tensor, record: LastForward | None, index: int) -> Tensor:
    """``out`` (the block's real tokens) carrying ``prompts_out`` (its prompt tokens' output) to the next block."""
    setattr(out, CARRY, prompts_out)
    if record is not None:
        record.carry[index] = prompts_out
    return out


# ------------------------------------------------------------------------------------------------ layer scope


@dataclasses.dataclass
class LayerCall:
    """What one call of a prompted block hands to its attention modules and its pre-attention norm."""

    prompts: object  # the block's TCPAPrompts
    x: Tensor  # [B, N, C] the block input
    normed: Tensor | None  # [B, N, C] the pre-attention norm of x, computed with the matching, or None
    selection: Selection
    prompt_kv: Tensor | None  # [2, H, P, D] / [B, 2, H, P, D] from the model's provider, or None ...
    tokens: Tensor | None  # ... and then this call's prompt tokens [P, C] / [B, P, C], which each attention projects


_SCOPE = threading.local()


def enter_layer(call: LayerCall) -> LayerCall | None:
    """Make ``call`` the current layer call of this thread; returns the one it replaces (for ``leave_layer``)."""
    previous = getattr(_SCOPE, "call", None)
    _SCOPE.call = call
    return previous


def leave_layer(previous: LayerCall | None) -> None:
    _SCOPE.call = previous


def layer_call(prompts) -> LayerCall:
    """The current call of the block that owns ``prompts`` (a RuntimeError outside that block's forward)."""
    call = getattr(_SCOPE, "call", None)
    if call is None or call.prompts is not prompts:
        raise RuntimeError("a TCPA attention module runs inside its block's forward only (the block selects the "
                           "prompts for its input first); call the block, not its attention module")
    return call


def current_norm_output(x: Tensor) -> Tensor | None:
    """The pre-attention norm of ``x`` when the current layer call computed it with the matching, else None."""
    call = getattr(_SCOPE, "call", None)
    return call.normed if call is not None and call.x is x else None


# --------------------------------------------------------------------------------- TCPAPrompts on their own

_LOOSE = threading.local()


def record_loose(prompts, terms: Tensor | None) -> None:
    """Matching-loss terms of a TCPAPrompts module called on its own (in a hand-written model, which has no
    prompted-model forward): per thread, the modules that ran since the first of them last ran make one forward."""
    if _in_backward():  # a checkpointed block recomputed
        return
    record = getattr(_LOOSE, "terms", None)
    if record is None or prompts in record:  # this layer ran already: a new forward began
        record = _LOOSE.terms = {}
    record[prompts] = terms


def loose_matching_loss(modules) -> Tensor | None:
    """Sum of the terms the last forward recorded for these TCPAPrompts modules (None when none did)."""
    record = getattr(_LOOSE, "terms", None) or {}
    terms = [record[m] for m in modules if record.get(m) is not None]
    return sum_terms(terms) if terms else None
