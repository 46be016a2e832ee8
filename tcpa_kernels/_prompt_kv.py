"""Prompt keys/values of every layer of a TCPA model for one forward (docs/how-it-works.md, 'Attention' to 'In a ViT
block').

A layer's prompt K/V are its prompt tokens (after prompt dropout and the prompt transform) through the layer's own
pre-attention norm, the K/V rows of its input projection and its k norm: prompts are prefix tokens without position.
They depend on the parameters only, so one forward computes them for all layers at once, from the parameters as they
are at that call (nothing is kept between forwards):

- the prompt tokens of all layers: one ``cat``, one dropout draw (one mask for the batch -> ``[L, P, C]``, or one per
  sample -> ``[L, B, P, C]``; a prompt bank's: one mask over its prompt sets) and the prompt transform (VFPT's
  Fourier prompts). In the common case (one mask, no transform, a gradient to compute) the ``cat`` and the dropout
  run inside the projection's node below (:class:`PromptParts`), so they add no autograd nodes of their own; in the
  prompt K/V kernels the dropout is drawn inside the kernels themselves (Philox from one seed, redrawn by the
  backward: no mask op, no mask kept), a mask per sample too (the kernels read the ``[L, P, C]`` tokens once per
  sample: no ``[L, B, P, C]`` copy);
- when every layer's norm is a LayerNorm with one eps and every layer the same projection shape (a ViT's blocks), on
  the triton backend where every layer's key and value rows are blocks of rows of its weights and the norms and
  weights are frozen: one Triton kernel each way for all layers (``ops/_prompt_kv_kernels.py``, ``_kernel_inputs``),
  which reads the weights in place and writes each layer's K/V as the contiguous [.., 2, H, P, D] the attention
  reads (under torch.compile and dispatch modes as the kernel ops ``prompt_kv_fwd`` / ``prompt_kv_bwd``).
  Otherwise one layer norm without affine over all layers, the per-layer affine as one ``addcmul`` on the prompts,
  and one batched GEMM with the layers' K/V rows stacked, ``[L, 2*C_kv, C]``. The affine is applied to
  the L*P prompt rows, not folded into the weights: folding would write a ``[L, 2*C_kv, C]`` product every forward,
  ~40x the prompt rows at ViT-B/16 (P = 36 of C = 768). With the norms and weights frozen and a gradient to
  compute, norm, affine and GEMM are one autograd node (``_FrozenNormLinear``: one Python node each way, a host cost
  of every step; without a gradient, plain ops). Otherwise one norm + linear per layer.

A block family says how one of its blocks projects prompts (``BlockFamily.kv_projection``, a :class:`KVProjection`)
or that it cannot (several attentions per block): then every block's attention projects the prompt tokens itself.
FSDP2: when the blocks' weights are shards outside their own forward, each block computes its own K/V inside its
forward (``layer_kv``). All of it runs in the parameters' dtype outside autocast (a 16-bit copy of the weights would
be made and saved for backward otherwise); the attention kernels cast the prompt tiles on load.
"""

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcpa_kernels._backend import autocast_off, kernels, resolve_backend
from tcpa_kernels._patch import any_shard
from tcpa_kernels.integrations.prompt_tokens import drop_prompts, forward_tokens
from tcpa_kernels.ops import _prompt_kv_table
from tcpa_kernels.ops._function import kernel_op, traced


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` of a module's parameter or buffer ``name`` (all of it when ``rows`` is None), read from the
    module at each call: a projection names where its tensors are, so it never holds a stale one."""

    module: nn.Module
    name: str
    rows: slice | None = None

    def whole(self) -> Tensor:
        """The whole parameter or buffer (read through the module's dicts: ``Module.__getattr__`` costs ~0.7 us a
        name, and every forward reads every layer's)."""
        module = self.module
        t = module._parameters.get(self.name)
        return module._buffers[self.name] if t is None and self.name in module._buffers else t

    def get(self) -> Tensor:
        t = self.whole()
        return t if self.rows is None else t[self.rows]


@dataclasses.dataclass(frozen=True)
class KVProjection:
    """How one block turns prompt tokens ``[..., P, C]`` into keys and values ``[..., 2, H, P, D]``: made once per
    block when the model is patched (``PromptState.projections``), from the block's own modules."""

    norm: nn.Module | None  # the pre-attention norm the prompts go through (None: post-norm, none)
    weights: tuple[Rows, ...]  # row blocks of W_kv, K rows then V rows: [2 * kv_heads * D, C] once concatenated
    biases: tuple[Rows, ...] | None  # the matching bias blocks, or None (no bias)
    k_norm: nn.Module | None  # the attention's norm of the keys over D (qk_norm), or None
    kv_heads: int
    head_dim: int
    groups: int = 1  # query heads per K/V head (grouped-query attention): K/V heads are repeated for the kernels

    def weight(self) -> Tensor:
        return _cat([rows.get() for rows in self.weights])

    def bias(self) -> Tensor | None:
        return None if self.biases is None else _cat([rows.get() for rows in self.biases])

    # ((key weight rows, first row), (value weight rows, first row)[, (key bias, first), (value bias, first)]) where
    # the block's key rows and its value rows are each one block of rows of a weight (of one packed weight, or of two)
    # and so are its biases', with neither a k norm nor grouped heads after: what the prompt K/V kernels read
    # (``_kernel_inputs``); else None. The block's structure, not its values: made with the projection, so a forward
    # only reads it (a lazily cached property takes a lock in Python 3.11, which torch.compile cannot trace)
    kv_blocks: tuple[tuple[Rows, int], ...] | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        half = self.kv_heads * self.head_dim
        weights = _key_value_blocks(self.weights, half)
        biases = None if self.biases is None else _key_value_blocks(self.biases, half)
        readable = not (self.k_norm is not None or self.groups != 1 or weights is None
                        or (self.biases is not None and biases is None))
        object.__setattr__(self, "kv_blocks", weights + (biases or ()) if readable else None)  # (frozen dataclass)


def _key_value_blocks(blocks: tuple[Rows, ...], half: int) -> tuple[tuple[Rows, int], tuple[Rows, int]] | None:
    """((Rows, first row) of the key rows, of the value rows) of ``blocks``: one block of 2 * half rows, or two of
    half rows each; else None."""
    spans = []
    for rows in blocks:
        n = rows.whole().shape[0]
        start, stop, step = (0, n, 1) if rows.rows is None else rows.rows.indices(n)
        if step != 1:
            return None
        spans.append((rows, start, stop - start))
    if len(spans) == 1 and spans[0][2] == 2 * half:
        rows, start, _ = spans[0]
        return (rows, start), (rows, start + half)
    if len(spans) == 2 and spans[0][2] == spans[1][2] == half:
        return (spans[0][0], spans[0][1]), (spans[1][0], spans[1][1])
    return None


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def prompt_parameters(state) -> list[Tensor]:
    """Every layer's prompt parameters in layer order: [prompts_cls_0, prompts_img_0, prompts_cls_1, ...]."""
    parts = []
    for blk in state.blocks:
        params = blk._modules["tcpa"]._parameters  # dict reads: see Rows.whole
        parts += (params["prompts_cls"], params["prompts_img"])
    return parts


@dataclasses.dataclass(frozen=True)
class PromptParts:
    """Every layer's prompt parameters as the prompt tokens they make (``shape``: [L, P, C], or a prompt bank's
    [L, T', P, C]), one dropout mask for all of them (``p``, 0: none), not yet concatenated: the projection node
    concatenates them and drops them out itself (``_PromptKV``: inside the kernels; ``_FrozenNormLinear``);
    ``tensor()`` makes them with plain ops. ``shared``: the parameters' [L, P, C] tokens for each of the B samples
    of ``shape`` [L, B, P, C], a dropout mask per sample (the published per-sample dropout; only the kernels'
    node takes them so, ``tensor()`` expands them)."""

    parts: list[Tensor]  # [prompts_cls_0, prompts_img_0, ...] (a bank's: its prompt sets), concatenated on dim 0
    shape: tuple[int, ...]  # [L, P, C] or [L, T', P, C] ([L, B, P, C] shared)
    p: float  # dropout probability, 0 <= p < 1
    shared: bool = False
    requires_grad: ClassVar[bool] = True  # ``layer_tokens`` makes them only where a part requires grad

    def tensor(self) -> Tensor:
        if self.shared:
            L, B, P, C = self.shape
            return drop_prompts(_cat(self.parts).reshape(L, P, C), self.p, True, B)
        tokens = _cat(self.parts).reshape(self.shape)
        return F.dropout(tokens, self.p) if self.p else tokens


def layer_tokens(state, parts: list[Tensor], batch_size: int, bank=None) -> Tensor | PromptParts:
    """Prompt tokens of every layer for this forward from their parameters (``prompt_parameters``): [L, P, C], or
    [L, B, P, C] with a dropout mask per sample; with a prompt ``bank`` (a ``_forward.BankCall``) its prompt sets
    for the forward, [L, T', P, C] (or [L, B, P, C], per sample already), one mask over all of them. As
    ``PromptParts`` where a gradient flows to them and no transform follows (``shared`` with a mask per sample)."""
    config = state.config
    p = config.prompt_dropout if state.training else 0.0
    if bank is None:
        if config.prompt_len_cls != config.prompt_len_img:  # else [Pc, L, C] and [Pi, L, C] stack on their first dim
            parts = [t.flatten(0, 1) for t in parts]
        shape = (len(state.blocks), config.num_prompts, parts[0].shape[-1])
        per_sample = p and config.prompt_dropout_per_sample
    else:
        parts = [bank.prompt_sets()]
        shape, per_sample, batch_size = tuple(parts[0].shape), False, None
    if (torch.is_grad_enabled() and config.prompt_transform == "none" and p < 1
            and any(t.requires_grad for t in parts)):
        if per_sample:  # the [L, P, C] tokens for each sample: [L, B, P, C]
            return PromptParts(parts, (shape[0], batch_size, *shape[1:]), p, shared=True)
        return PromptParts(parts, shape, p)
    prompts = _cat(parts).reshape(shape)  # [L, P, C] (one cat) or a bank's sets
    return forward_tokens(prompts, config, state.training, batch_size)


def _heads(kv: Tensor, projection: KVProjection) -> Tensor:
    """K/V rows of prompts [..., P, 2 * kv_heads * D] -> keys and values [..., 2, H, P, D] (a view when the block
    has no k norm and no grouped heads): k norm on the keys, K/V heads repeated for grouped-query attention."""
    kv = kv.unflatten(-1, (2, projection.kv_heads, projection.head_dim))  # [..., P, 2, Hkv, D]
    if projection.k_norm is not None:
        kv = torch.stack([projection.k_norm(kv[..., 0, :, :]), kv[..., 1, :, :]], dim=-3)
    if projection.groups > 1:
        kv = kv.repeat_interleave(projection.groups, dim=-2)
    return kv.movedim(-4, -2)  # [..., 2, H, P, D]


def layer_kv(projection: KVProjection, tokens: Tensor) -> Tensor:
    """One block's prompt K/V from its prompt tokens [P, C] / [B, P, C]: [2, H, P, D] / [B, 2, H, P, D]."""
    with torch.autocast(tokens.device.type, enabled=False):
        normed = tokens if projection.norm is None else projection.norm(tokens)
        return _heads(F.linear(normed, projection.weight(), projection.bias()), projection)


def _batchable(projections: list[KVProjection]) -> bool:
    """Every layer's norm a LayerNorm over C with one eps (or none at all), one projection shape, all with a bias or
    none: the layers share one layer norm and one batched GEMM."""
    first = projections[0]
    norm_kinds = {None if p.norm is None else (type(p.norm), getattr(p.norm, "eps", None),
                                               tuple(getattr(p.norm, "normalized_shape", ()))) for p in projections}
    return (len(norm_kinds) == 1 and (first.norm is None or isinstance(first.norm, nn.LayerNorm))
            and len({(p.kv_heads, p.head_dim, p.groups, p.biases is None) for p in projections}) == 1)


def _norm_parameters(norms: list[nn.LayerNorm]) -> tuple[Tensor | None, Tensor | None]:
    """The layers' LayerNorm weights and biases stacked, [L, 1, C] each (None where the norms have none)."""
    first = norms[0]._parameters  # dict reads: see Rows.whole
    return tuple(None if first[name] is None else torch.stack([n._parameters[name] for n in norms]).unsqueeze(1)
                 for name in ("weight", "bias"))


def _affine(normed: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """normed [L, M, C] times each layer's LayerNorm weight plus its bias ([L, 1, C] or None: 1 and 0)."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, normed, weight)
    if weight is not None:
        return normed * weight
    return normed if bias is None else normed + bias


def _pieces(rows: list[Rows], num_layers: int) -> tuple[list[Tensor], slice | None, bool]:
    """The tensors to stack for the layers' row blocks: (tensors, rows, stack). When every layer has one block with
    the same rows (a packed projection's K/V rows): the layers' whole tensors, stacked, then those rows taken once;
    else the blocks themselves, concatenated."""
    if len(rows) == num_layers and all(r.rows == rows[0].rows for r in rows):
        return [r.whole() for r in rows], rows[0].rows, True
    return [r.get() for r in rows], None, False


def _stacked(tensors: list[Tensor] | tuple[Tensor, ...], rows: slice | None, stack: bool, num_layers: int) -> Tensor:
    """[L, R, ...]: the layers' blocks of ``_pieces`` in one tensor (one stack and a slice, or one cat)."""
    if stack:
        stacked = torch.stack(tensors)  # [L, rows of the whole tensor, ...]
        return stacked if rows is None else stacked[:, rows]
    blocks = torch.cat(tensors)
    return blocks.view(num_layers, -1, *blocks.shape[1:])


class _FrozenNormLinear(torch.autograd.Function):
    """Every layer's frozen linear map, after its frozen LayerNorm when ``eps`` is given, in one node and one batched
    GEMM: ``apply(x, spec, norm_weight, norm_bias, bias, *tensors)`` with x [L, M, C] (or None: see ``dropout``),
    ``spec = (eps, rows, stack, weights, dropout)``, the norm's parameters [L, 1, C] or None, bias [L, 1, R] or None,
    ``tensors`` the ``weights`` tensors ``_pieces`` gives, then with ``dropout`` (the shape [L, P, C] and the
    probability of ``PromptParts``) the prompt parameters, which the node concatenates into x and drops out
    (``_dropout``: one mask) -> LN_l(x_l) @ W_l^T + b_l, [L, M, R]. Differentiable in x (or the prompt
    parameters) and the bias (the norm's parameters and the weights are frozen).

    The stacked weight is a copy of the layers' weights (of their whole packed tensors when the K/V rows are a slice
    of them: [L, 3C, C], ~85 MB at ViT-B/16 in fp32): it is made for the GEMM and dropped, and made again in the
    backward, rather than kept for it (autograd would save the copy every step, of weights that are parameters
    anyway). The backward keeps the weight tensors, never their modules, the norm's statistics and the dropout
    mask."""

    @staticmethod
    def forward(ctx, x, spec, norm_weight, norm_bias, bias, *tensors):
        eps, rows, stack, weights, dropout = spec
        mask = None
        if dropout is not None:  # x from the prompt parameters: one cat, one mask
            x, mask = _prompt_tokens(ctx, tensors[weights:], dropout)
        tensors = tensors[:weights]
        mean = rstd = None
        if eps is not None:  # [L, M, C] normalised over C, then each layer's affine
            normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
            h = _affine(normed, norm_weight, norm_bias)
        else:
            h = x
        ctx.save_for_backward(x, norm_weight, mean, rstd, mask, *tensors)
        ctx.spec = spec
        weight = _stacked(tensors, rows, stack, x.shape[0]).transpose(1, 2)  # [L, C, R]
        return torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)

    @staticmethod
    def backward(ctx, grad):  # grad [L, M, R]
        x, norm_weight, mean, rstd, mask, *tensors = ctx.saved_tensors
        _, rows, stack, weights, dropout = ctx.spec
        needs = ctx.needs_input_grad
        need_x, need_bias = needs[0] or any(needs[5 + weights:]), needs[4]
        grad_x = grad_bias = None
        if need_x:
            grad_x = torch.bmm(grad, _stacked(tensors, rows, stack, grad.shape[0]))  # [L, M, C]
            if mean is not None:  # the norm's input gradient
                grad_normed = grad_x if norm_weight is None else grad_x * norm_weight
                grad_x = torch.ops.aten.native_layer_norm_backward(grad_normed, x, (x.shape[-1],), mean, rstd, None,
                                                                   None, (True, False, False))[0]
        if need_bias:
            grad_bias = grad.sum(1, keepdim=True)
        if dropout is None:
            return grad_x, None, None, None, grad_bias, *([None] * weights)
        parts = (None,) * len(ctx.sizes) if grad_x is None else _part_grads(ctx, grad_x, mask, dropout[1])
        return None, None, None, None, grad_bias, *([None] * weights), *parts


def _joined(ctx, parts: tuple[Tensor, ...], shape: tuple[int, int, int]) -> Tensor:
    """Inside a node's forward: the prompt tokens [L, M, C] (``shape``) the prompt parameters ``parts`` make (one
    cat; one part: itself), keeping on ``ctx`` what ``_part_grads`` needs."""
    ctx.sizes = [t.shape[0] for t in parts]  # the cat's gradient: split back along dim 0
    x = _cat(list(parts))
    ctx.cat_shape = x.shape
    return x.reshape(shape)


def _prompt_tokens(ctx, parts: tuple[Tensor, ...], dropout: tuple[tuple[int, int, int], float]) -> tuple[Tensor,
                                                                                                        Tensor | None]:
    """Inside a node's forward: (the prompt tokens [L, M, C] of ``_joined``, then one dropout mask (``dropout``:
    (shape, p)), what the dropout's backward needs or None)."""
    shape, p = dropout
    x = _joined(ctx, parts, shape)
    return _dropout(x, p) if p else (x, None)


def _part_grads(ctx, grad_x: Tensor, mask: Tensor | None, p: float) -> tuple[Tensor, ...]:
    """The prompt parameters' gradients from the tokens' grad_x [L, P, C] (``_prompt_tokens``' ctx and mask): the
    dropout's backward (its bool mask, or the multipliers ``_dropout`` kept), then views of one tensor."""
    if mask is not None:
        grad_x = (torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p)) if mask.dtype == torch.bool
                  else grad_x * mask)
    return grad_x.view(ctx.cat_shape).split_with_sizes(ctx.sizes)


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x dropped out with probability p, what its backward needs) with the kernels ``F.dropout`` uses on x's device:
    on CUDA the fused ``native_dropout`` (its bool mask), elsewhere a Bernoulli draw of multipliers 0 or 1 / (1 - p)
    and one product (the multipliers: the backward is one product too, where ``native_dropout``'s backward casts
    its mask on the CPU)."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)
    multipliers = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * multipliers, multipliers


def _norm_linear(x: Tensor | PromptParts, norms: list[nn.LayerNorm] | None, bias: Tensor | None,
                 rows: list[Rows]) -> Tensor:
    """x [L, M, C] (or the ``PromptParts`` that make it) through each layer's LayerNorm (``norms``, one eps; None: no
    norm) and linear map (``rows``: the weights' row blocks in layer order): [L, M, R]. One node where the
    parameters are frozen and a gradient flows back through x or the bias; else plain ops (autograd through the norm
    and the stacked weights, or nothing recorded: evaluation, where the node would be host time for nothing and
    where dynamo, inlining its forward under ``no_grad``, would pass it the norm's eps as a tensor)."""
    tensors, common_rows, stack = _pieces(rows, x.shape[0])
    norm_weight, norm_bias = (None, None) if norms is None else _norm_parameters(norms)
    node = (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
            and not any(t.requires_grad for t in tensors))
    norm_inside = norms is not None and node and not any(
        t is not None and t.requires_grad for t in (norm_weight, norm_bias))
    parts = isinstance(x, PromptParts)
    if parts and not node:
        x, parts = x.tensor(), False
    if norms is not None and not norm_inside:  # plain ops
        x, parts = _affine(F.layer_norm(_tensor(x), (x.shape[-1],), eps=norms[0].eps), norm_weight, norm_bias), False
    if node:
        eps = norms[0].eps if norm_inside else None
        spec = (eps, common_rows, stack, len(tensors), (x.shape, x.p) if parts else None)
        norm = (norm_weight, norm_bias) if norm_inside else (None, None)
        return _FrozenNormLinear.apply(None if parts else x, spec, *norm, bias, *tensors, *(x.parts if parts else ()))
    weight = _stacked(tensors, common_rows, stack, x.shape[0]).transpose(1, 2)  # [L, C, R]
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)


def _tensor(x: Tensor | PromptParts) -> Tensor:
    return x.tensor() if isinstance(x, PromptParts) else x


class _PromptKV(torch.autograd.Function):
    """The triton backend's prompt K/V pass as one node: ``apply(x, spec, *parts)`` with x [L, M, C] (or None: the
    prompt parameters ``parts`` make it, ``_joined``), ``spec = (kernel inputs, dropout)`` (``_kernel_inputs``;
    dropout: (shape, p) with parts, else None) -> kv [L, T, 2, H, P, D] (``_prompt_kv_kernels``: one launch each
    way, the prompt dropout inside them). Differentiable in x (or the parts); the norms, weights and biases are
    frozen, read by the kernels through the table of their addresses (the node keeps the tensors alive until its
    backward)."""

    @staticmethod
    def forward(ctx, x, spec, *parts):
        inputs, dropout = spec
        seed, p = None, 0.0
        if dropout is not None:  # x from the prompt parameters: one cat; the kernels drop it out
            shape, p = dropout
            x = _joined(ctx, parts, shape)
            seed = _prompt_kv_table.dropout_seed(x.device) if p else None
        kv, mean, rstd = _forward_launch(inputs, x, seed, p)
        ctx.save_for_backward(x, mean, rstd, seed)
        ctx.spec = spec
        return kv

    @staticmethod
    def backward(ctx, grad):  # grad [L, T, 2, H, P, D]
        x, mean, rstd, seed = ctx.saved_tensors
        inputs, dropout = ctx.spec
        p = 0.0 if dropout is None else dropout[1]
        if inputs.plan is not None:
            grad_x = kernels("_prompt_kv_kernels").backward(grad, x, mean, rstd, inputs.plan, seed, p)
        else:
            grad_x = prompt_kv_bwd(grad, x, mean, rstd, *inputs.op_args(), seed, p)
        if dropout is None:
            return grad_x, None
        return None, None, *_part_grads(ctx, grad_x, None, p)


@dataclasses.dataclass(frozen=True)
class _KernelInputs:
    """What the prompt K/V kernels take besides x: per layer the tensors of their address table (``layers``: key
    weight, value weight, norm weight, norm bias, key bias, value bias, None where absent; kept alive by the node),
    the prompt sets per layer, the heads and head dim, the key and value blocks' first rows and the norm's eps
    (``_prompt_kv_table.KVLayers``), whether the sets share x's rows, and ``plan``, the kernels' ``KVLayers`` with its
    table, or None while tracing (the kernel ops make it at their launch)."""

    layers: list[tuple]
    sets: int
    heads: int
    head_dim: int
    rows: tuple[int, int, int, int]
    eps: float | None
    shared: bool
    plan: tuple | None

    def op_args(self) -> tuple:
        """The kernel ops' arguments after x (and the backward's gradient, statistics): tensors, shape, eps, shared."""
        return ([t for layer in self.layers for t in layer], self.sets, self.heads, self.head_dim, list(self.rows),
                self.eps, self.shared)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_inputs(projections: list[KVProjection], x: Tensor | PromptParts, sets: int) -> _KernelInputs | None:
    """The kernels' inputs for x [L, M, C] (M = sets * P) through ``projections`` (``_batchable``), or None where
    the kernels do not apply and the torch ops run: a layer whose key or value rows are not one block of a weight
    (``KVProjection.kv_blocks``), or not at the same rows in every layer, a norm, weight or bias that requires grad,
    a tensor that is not x's dtype (fp32, fp16 or bf16; bf16 off CUDA: the interpreter's bf16 dots are wrong) or
    not contiguous (``_prompt_kv_table.readable``; in eager mode checked once per set of addresses, with the table
    made: ``weight_table``), or no prompt sets (an empty batch's, with a dropout mask per sample)."""
    first = projections[0]
    dtype = x.dtype if isinstance(x, Tensor) else x.parts[0].dtype
    device = first.weights[0].whole().device
    if (dtype not in _KERNEL_DTYPES or (dtype == torch.bfloat16 and device.type != "cuda") or not sets
            or (isinstance(x, Tensor) and x.stride(-1) != 1)):
        return None  # (off CUDA the triton backend runs the interpreter: ``resolve_backend`` checks it)
    blocks = [p.kv_blocks for p in projections]
    starts = None if blocks[0] is None else tuple(start for _, start in blocks[0])
    if starts is None or any(b is None or tuple(start for _, start in b) != starts for b in blocks):
        return None
    has_bias = len(starts) == 4
    layers = []
    for p, b in zip(projections, blocks):
        norm = {} if p.norm is None else p.norm._parameters  # dict reads: see Rows.whole
        weights = [rows.whole() for rows, _ in b]
        layers.append((weights[0], weights[1], norm.get("weight"), norm.get("bias"),
                       *(weights[2:] if has_bias else (None, None))))
    if any(t is not None and t.requires_grad for layer in layers for t in layer):
        return None
    starts = starts if has_bias else (*starts, 0, 0)
    C = x.shape[-1]
    shared = isinstance(x, PromptParts) and x.shared
    config = (sets, first.kv_heads, first.head_dim, starts, None if first.norm is None else first.norm.eps, shared)
    if traced():  # torch.compile, a dispatch mode: the kernel ops, which make the table at their launch
        needed = _prompt_kv_table.rows_needed(starts, first.kv_heads, first.head_dim)
        return _KernelInputs(layers, *config, None) if _prompt_kv_table.readable(dtype, C, needed, layers) else None
    plan = _prompt_kv_table.kv_layers(dtype, C, layers, *config)
    return None if plan is None else _KernelInputs(layers, *config, plan)


def _forward_launch(inputs: _KernelInputs, x: Tensor, seed: Tensor | None = None,
                    p: float = 0.0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(kv, mean, rstd) of ``_prompt_kv_kernels.forward``: its launcher in eager mode, the kernel op while
    tracing."""
    if inputs.plan is not None:
        return kernels("_prompt_kv_kernels").forward(x, inputs.plan, seed, p)
    kv, mean, rstd = prompt_kv_fwd(x, *inputs.op_args(), seed, p)
    return (kv, None, None) if inputs.eps is None else (kv, mean, rstd)


def _plan_of(x: Tensor, tensors: list[Tensor | None], sets: int, heads: int, head_dim: int, rows: list[int],
             eps: float | None, shared: bool):
    """The ``KVLayers`` the kernel ops launch with (made at the launch: a table of addresses)."""
    columns = _prompt_kv_table.TABLE_COLUMNS
    layers = [tuple(tensors[i:i + columns]) for i in range(0, len(tensors), columns)]
    plan = _prompt_kv_table.kv_layers(x.dtype, x.shape[-1], layers, sets, heads, head_dim, tuple(rows), eps, shared)
    if plan is None:
        raise ValueError("prompt_kv: the weights are not readable by the prompt K/V kernels (dtype, device, shape or "
                         "contiguity changed since the trace)")
    return plan


@kernel_op("tcpa_kernels::prompt_kv_fwd")
def prompt_kv_fwd(x: Tensor, tensors: list[Tensor | None], sets: int, heads: int, head_dim: int, rows: list[int],
                  eps: float | None, shared: bool, seed: Tensor | None, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """One launch of the prompt K/V forward kernel (``_prompt_kv_kernels.forward``; ``_KernelInputs.op_args``):
    (kv [L, sets, 2, heads, P, head_dim], mean, rstd [L, M] fp32, or [0] each without a norm)."""
    plan = _plan_of(x, tensors, sets, heads, head_dim, rows, eps, shared)
    kv, mean, rstd = kernels("_prompt_kv_kernels").forward(x, plan, seed, p)
    if mean is None:
        return kv, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return kv, mean, rstd


@prompt_kv_fwd.register_fake
def _(x, tensors, sets, heads, head_dim, rows, eps, shared, seed, p):
    L, x_rows, _ = x.shape
    M = sets * x_rows if shared else x_rows
    stats = (0,) if eps is None else (L, M)
    return (x.new_empty((L, sets, 2, heads, M // sets, head_dim)), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@kernel_op("tcpa_kernels::prompt_kv_bwd")
def prompt_kv_bwd(grad: Tensor, x: Tensor, mean: Tensor | None, rstd: Tensor | None,
                  tensors: list[Tensor | None], sets: int, heads: int, head_dim: int, rows: list[int],
                  eps: float | None, shared: bool, seed: Tensor | None, p: float) -> Tensor:
    """One launch of the prompt K/V backward kernel (``_prompt_kv_kernels.backward``): dx [L, M, C]."""
    plan = _plan_of(x, tensors, sets, heads, head_dim, rows, eps, shared)
    return kernels("_prompt_kv_kernels").backward(grad, x, mean, rstd, plan, seed, p)


@prompt_kv_bwd.register_fake
def _(grad, x, mean, rstd, tensors, sets, heads, head_dim, rows, eps, shared, seed, p):
    return x.new_empty(x.shape)


def _kernel_kv(inputs: _KernelInputs, x: Tensor | PromptParts) -> Tensor:
    """kv [L, T, 2, H, P, D] of x [L, M, C] (or its ``PromptParts``) through the prompt K/V kernels: one node where a
    gradient flows back to x, else one launch."""
    if isinstance(x, PromptParts):  # x [L, M, C]; shared: the parts make [L, M / sets, C]
        L, M, C = x.shape
        shape = (L, M // inputs.sets, C) if x.shared else x.shape
        return _PromptKV.apply(None, (inputs, (shape, x.p)), *x.parts)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PromptKV.apply(x, (inputs, None))
    return _forward_launch(inputs, x)[0]


def _batched_kv(projections: list[KVProjection], tokens: Tensor | PromptParts, backend: str) -> list[Tensor]:
    """One layer norm and one batched GEMM for all layers (on the triton backend, where ``_kernel_inputs`` allows:
    one kernel each way): tokens [L, ..., P, C] (or their ``PromptParts``) -> per layer
    [..., 2, H, P, D]."""
    L, C = tokens.shape[0], tokens.shape[-1]
    sets = 1 if len(tokens.shape) == 3 else tokens.shape[1]
    flat_shape = (L, sets * tokens.shape[-2], C)  # [L, M, C]: M = P or sets * P
    flat = (tokens.reshape(flat_shape) if isinstance(tokens, Tensor)
            else dataclasses.replace(tokens, shape=flat_shape))
    inputs = _kernel_inputs(projections, flat, sets) if backend == "triton" else None
    if inputs is not None:
        kv = _kernel_kv(inputs, flat)  # [L, sets, 2, H, P, D]
        return list((kv.squeeze(1) if len(tokens.shape) == 3 else kv).unbind(0))
    if isinstance(flat, PromptParts) and flat.shared:  # the torch ops: the parts expanded, a mask per sample
        tokens = tokens.tensor()
        flat = tokens.reshape(flat_shape)
    first = projections[0]
    bias = None if first.biases is None else _stacked(*_pieces([r for p in projections for r in p.biases], L), L)
    norms = None if first.norm is None else [p.norm for p in projections]
    kv = _norm_linear(flat, norms, None if bias is None else bias.unsqueeze(1),
                      [r for p in projections for r in p.weights])  # [L, M, 2*C_kv]
    if first.k_norm is None and first.groups == 1:  # the common case: one view for all layers
        kv = kv.view(*tokens.shape[:-1], 2, first.kv_heads, first.head_dim)  # [L, ..., P, 2, H, D]
        return list(kv.movedim(-4, -2).unbind(0))
    return [_heads(layer, p) for layer, p in zip(kv.view(*tokens.shape[:-1], -1).unbind(0), projections)]


def all_layers_kv(state, batch_size: int, bank=None) -> list[Tensor | None]:
    """Prompt K/V of every layer for this forward, in one pass: per layer [2, H, P, D] (or [B, 2, H, P, D] with a
    dropout mask per sample; a prompt bank's forward, ``bank`` (a ``_forward.BankCall``): [T, 2, H, P, D], the
    bank's T prompt sets, or [B, 2, H, P, D], each sample's task's set with its own dropout mask). All None when
    the blocks project their own: a family without a K/V projection of its own, or FSDP2 shards."""
    projections = state.projections
    if projections[0] is None:
        return [None] * len(projections)
    parts = prompt_parameters(state) if bank is None else [bank.prompts]
    if any_shard(parts):  # FSDP2: each block is its own shard group, whole inside its own forward only
        if bank is not None:
            raise ValueError("model: a prompt bank does not run on FSDP2 shards (its blocks would project the "
                             "backbone's own prompts); run it unsharded")
        return [None] * len(projections)
    # [L, P, C] or [L, B, P, C]; a bank's: the batch's tasks', [L, T', P, C], or each sample's task's, [L, B, P, C]
    tokens = layer_tokens(state, parts, batch_size, bank)
    with autocast_off(parts[0].device.type):
        if _batchable(projections):
            return _batched_kv(projections, tokens, resolve_backend(state.config.backend, parts[0].device))
        return [layer_kv(p, t) for p, t in zip(projections, _tensor(tokens).unbind(0))]
