"""``TCPAPrompts``: one layer's TCPA prompts as a module (docs/how-it-works.md, 'Pools and prompts' to 'In a ViT
block'), the one place a layer does TCPA.

It owns the layer's two prompt pools and their keys and does the layer's TCPA work around the user's attention:
cosine matching of the block input against the keys, top-k selection per token (or a random k-subset), the
matching-loss terms, the prompt tokens (after prompt dropout) and the fused attention op over [prompts ; tokens].
Its state is its parameters and its config: what one forward computes (selection, loss terms, prompt K/V) is
returned to the caller, never kept on the module.

A hand-written ViT adds one per block and calls it in place of its softmax::

    self.tcpa = TCPAPrompts(dim, num_prefix_tokens=1)                  # in the block's __init__
    ...
    def forward(self, x):                                              # the block, pre-norm
        h = self.norm1(x)
        q, k, v = self.attn.heads(h)                                   # [B, H, N, D] each
        out = self.tcpa(q, k, v, x, lambda p: self.attn.heads(self.norm1(p))[1:])  # [B, H, N, D]
        x = x + self.attn.proj(out.transpose(1, 2).flatten(2))
        ...
    loss = task_loss + matching_weight * get_matching_loss(model)      # the layers of the model's last forward

Model integrations call the parts: ``select(x, norm)`` (matching, selection, loss terms; with the block's frozen
LayerNorm, the norm of x from the same kernel), ``prompt_tokens`` and ``attend`` / ``attend_packed`` with the
prompt K/V the model computed for all layers at once (``_prompt_kv.py``).
"""

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._forward import LayerBank, record_loose
from tcpa_kernels._validate import check_flag, check_int, check_pool_config, describe
from tcpa_kernels.integrations.prompt_tokens import check_prompt_options, forward_tokens
from tcpa_kernels.ops._function import topk_bits_op
from tcpa_kernels.ops.block import block_attention
from tcpa_kernels.ops.match_select import match, norm_match
from tcpa_kernels.ops.packed import packed_attention
from tcpa_kernels.ops.selection import Selection
from tcpa_kernels.ops.tcpa_attention import attention

SELECTION_MODES = ("topk", "random")
BACKENDS = ("auto", "triton", "torch")


@dataclasses.dataclass
class PoolConfig:
    """One layer's pools: sizes, top-k, prompt tokens per entry, prompt dropout, mask semantics, kernel backend."""

    pool_size_cls: int = 18
    pool_size_img: int = 18
    topk_cls: int = 10
    topk_img: int = 10
    prompt_len_cls: int = 1
    prompt_len_img: int = 1
    prompt_dropout: float = 0.1
    renormalize: bool = False
    backend: str = "auto"
    prompt_dropout_per_sample: bool = False
    prompt_transform: str = "none"
    fourier_fraction: float = 1.0

    @property
    def num_prompts(self) -> int:
        return self.pool_size_cls * self.prompt_len_cls + self.pool_size_img * self.prompt_len_img

    def validate(self, num_prefix_tokens: int) -> None:
        for name in ("pool_size_cls", "pool_size_img"):
            check_int(name, getattr(self, name), 1)
        check_pool_config("", self.pool_size_cls, self.pool_size_img, self.topk_cls, self.topk_img,
                          self.prompt_len_cls, self.prompt_len_img, num_prefix_tokens, num_prefix_tokens)
        check_prompt_options(self.prompt_dropout, self.prompt_transform, self.fourier_fraction)
        check_flag("prompt_dropout_per_sample", self.prompt_dropout_per_sample)
        check_flag("renormalize", self.renormalize)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")


class TCPAPrompts(nn.Module):
    """One layer's TCPA prompt pools and the TCPA attention that uses them.

    Parameters (initialised uniform(-1, 1) as published): ``keys_cls [Pc, C]``, ``keys_img [Pi, C]``,
    ``prompts_cls [Pc, Lc, C]``, ``prompts_img [Pi, Li, C]``. The first ``num_prefix_tokens`` tokens (CLS,
    registers) match the CLS pool, the others the image pool; each token uses the prompts of its top-k entries.

    ``selection_mode``: "topk" (cosine matching) or "random". Prompt dropout follows ``self.training``: one mask for
    the batch, or one per sample with ``prompt_dropout_per_sample`` (then the prompt keys/values are
    ``[B, H, P, D]``). ``prompt_transform="fourier"`` turns the first ``floor(fourier_fraction * P)`` prompt tokens
    into VFPT's Fourier prompts after dropout (``prompt_tokens``).
    """

    def __init__(self, dim: int, *, pool_size_cls: int = 18, pool_size_img: int = 18, topk_cls: int = 10,
                 topk_img: int = 10, prompt_len_cls: int = 1, prompt_len_img: int = 1, prompt_dropout: float = 0.1,
                 renormalize: bool = False, num_prefix_tokens: int = 1, backend: str = "auto",
                 prompt_dropout_per_sample: bool = False, prompt_transform: str = "none", fourier_fraction: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("num_prefix_tokens", num_prefix_tokens, 0)
        self.config = PoolConfig(
            pool_size_cls=pool_size_cls, pool_size_img=pool_size_img, topk_cls=topk_cls, topk_img=topk_img,
            prompt_len_cls=prompt_len_cls, prompt_len_img=prompt_len_img, prompt_dropout=prompt_dropout,
            renormalize=renormalize, backend=backend, prompt_dropout_per_sample=prompt_dropout_per_sample,
            prompt_transform=prompt_transform, fourier_fraction=fourier_fraction)
        self.config.validate(num_prefix_tokens)
        self.num_prefix_tokens = num_prefix_tokens
        self.selection_mode = "topk"
        shapes = dict(keys_cls=(pool_size_cls, dim), keys_img=(pool_size_img, dim),
                      prompts_cls=(pool_size_cls, prompt_len_cls, dim),
                      prompts_img=(pool_size_img, prompt_len_img, dim))
        for name, shape in shapes.items():
            value = torch.empty(shape, device=device, dtype=dtype).uniform_(-1.0, 1.0)
            self.register_parameter(name, nn.Parameter(value))

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.keys_cls.shape[1]}, pools=({c.pool_size_cls}, {c.pool_size_img}), "
                f"topk=({c.topk_cls}, {c.topk_img}), prompt_len=({c.prompt_len_cls}, {c.prompt_len_img}), "
                f"num_prefix_tokens={self.num_prefix_tokens}")

    def prompt_tokens(self, batch_size: int) -> Tensor:
        """This forward's prompt tokens, CLS-pool prompts first, after prompt dropout and the prompt transform:
        [P, C] shared by the batch, or [B, P, C] when dropout draws a mask per sample."""
        tokens = torch.cat([self.prompts_cls.flatten(0, 1), self.prompts_img.flatten(0, 1)])
        return forward_tokens(tokens, self.config, self.training, batch_size)

    def selection(self, bits: Tensor, tasks: Tensor | None = None, layouts: Tensor | None = None) -> Selection:
        c = self.config
        return Selection(bits=bits, pool_cls=c.pool_size_cls, len_cls=c.prompt_len_cls, len_img=c.prompt_len_img,
                         tasks=tasks, layouts=layouts)

    def _keys(self, bank: LayerBank | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(keys_cls, keys_img, tasks, prompt_tasks, layouts): this module's keys, or a prompt bank's key sets, each
        sample's task, its row of the forward's prompt sets and its own pools (None: this module's)."""
        if bank is not None:
            return bank
        params = self._parameters  # dict reads: a block asks at every call (``Module.__getattr__``: ~0.7 us a name)
        return params["keys_cls"], params["keys_img"], None, None, None

    def select(self, x: Tensor, norm: nn.Module | None = None,
               bank: LayerBank | None = None) -> tuple[Selection, Tensor | None, Tensor | None]:
        """Prompt selection of every token of the block input x [B, N, C].

        Returns ``(selection, terms, normed)``: the selection words; the matching-loss terms ``[B, N]`` fp32 (their
        sum is this layer's matching loss; None for random selection); ``norm(x)`` when ``norm`` (the block's
        pre-attention norm) is a frozen LayerNorm, which the matching kernel applies in the same pass over x (and
        whose input gradient its backward adds to the matching's in one dx), else None. In a prompt bank's forward
        (``bank``: this layer's key sets and each sample's task) each sample matches its task's keys, and the
        selection carries the tasks for the attention."""
        c = self.config
        keys_cls, keys_img, tasks, prompt_tasks, layouts = self._keys(bank)
        topk = (self.num_prefix_tokens, c.topk_cls, c.topk_img, self._backend_for(x))
        if self.selection_mode == "random":  # a random k-subset per token, no matching loss
            scores = torch.rand(*x.shape[:2], c.pool_size_cls + c.pool_size_img, device=x.device)
            bits = topk_bits_op(scores, layouts, self.num_prefix_tokens, c.pool_size_cls, *topk[1:])
            return self.selection(bits, prompt_tasks, layouts), None, None
        if norm is not None and fusable_norm(norm):
            normed, bits, terms = norm_match(x, keys_cls, keys_img, norm.weight, norm.bias, norm.eps, *topk, tasks,
                                             layouts)
            return self.selection(bits, prompt_tasks, layouts), terms, normed
        bits, terms = match(x, keys_cls, keys_img, *topk, tasks, layouts)
        return self.selection(bits, prompt_tasks, layouts), terms, None

    def _backend_for(self, x: Tensor) -> str:
        """The resolved backend for the block input x, after checking x is one ([B, N >= prefix tokens, C])."""
        C = self._parameters["keys_cls"].shape[1]
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != C or x.shape[1] < self.num_prefix_tokens:
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, N >= {self.num_prefix_tokens}, {C}] (the block input), got {got}")
        backend = resolve_backend(self.config.backend, x.device)
        if backend == "triton" and x.dtype == torch.float64:
            raise TypeError(f"x: backend='triton' takes fp16/bf16/fp32, got {describe(x)}; use backend='torch'")
        return backend

    def attend_block(self, x: Tensor, norm: nn.LayerNorm, qkv: nn.Linear, num_heads: int, prompt_kv: Tensor,
                     scale: float, proj: nn.Linear | None = None,
                     bank: LayerBank | None = None) -> tuple[Tensor, Tensor]:
        """A pre-norm block's attention from its input x ``[B, N, C]`` in one autograd node (``ops/block.py``):
        ``norm`` (a frozen LayerNorm, fused into the matching), the matching and top-k selection, ``qkv`` (a frozen
        linear C -> 3 * H * D), the attention over [selected prompts ; tokens] with prompt_kv ``[2, H, P, D]`` (or
        ``[B, 2, H, P, D]``) and, when given, ``proj`` (a frozen linear H * D -> C) and the residual. Returns (out
        ``[B, N, H*D]``, what the output projection reads, or with ``proj`` x + proj(out) ``[B, N, C]``; the
        matching-loss terms ``[B, N]``). Top-k selection only (``selection_mode == "topk"``). In a prompt bank's
        forward (``bank``) prompt_kv is the bank's ``[T, 2, H, P, D]``, each sample using its task's set."""
        c = self.config
        keys_cls, keys_img, tasks, prompt_tasks, layouts = self._keys(bank)
        return block_attention(x, keys_cls, keys_img, prompt_kv, norm, qkv, proj, num_heads, self.num_prefix_tokens,
                               c.topk_cls, c.topk_img, c.pool_size_cls, c.prompt_len_cls, c.prompt_len_img, scale,
                               c.renormalize, self._backend_for(x), tasks=tasks, prompt_tasks=prompt_tasks,
                               layouts=layouts)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prompt_kv: Tensor, selection: Selection,
               scale: float | None = None) -> Tensor:
        """Attention of the tokens over [selected prompts ; tokens]: q, k, v ``[B, H, N, D]``, prompt_kv
        ``[2, H, P, D]`` (or ``[B, 2, H, P, D]``) -> ``[B, H, N, D]``."""
        backend = resolve_backend(self.config.backend, q.device)
        return attention(q, k, v, prompt_kv, selection, q.shape[-1] ** -0.5 if scale is None else scale,
                         self.config.renormalize, backend, True)

    def attend_packed(self, qkv: Tensor, prompt_kv: Tensor, selection: Selection, scale: float) -> Tensor:
        """The same on timm's packed projection, read in place: qkv ``[B, N, 3, H, D]`` -> ``[B, N, H*D]``."""
        return packed_attention(qkv, prompt_kv, selection, scale, self.config.renormalize,
                                resolve_backend(self.config.backend, qkv.device), True)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor,
                project_kv: Callable[[Tensor], tuple[Tensor, Tensor]], *, scale: float | None = None) -> Tensor:
        """TCPA attention of one layer, all of it in one call (for hand-written ViTs).

        Args:
            q, k, v: ``[B, H, N, D]`` the attention's queries, keys and values of the N tokens (after its q/k norms
                and rotary embedding, if any).
            x: ``[B, N, C]`` the block input (the residual stream before the attention's norm): matching reads it.
            project_kv: prompt tokens ``[1, P, C]`` (``[B, P, C]`` with per-sample prompt dropout) -> their keys and
                values ``[1, H, P, D]`` (``[B, H, P, D]``) each, the way the attention computes them for tokens:
                pre-attention norm, K/V projection, k norm; no position.
            scale: score scale, default ``D ** -0.5``.

        Returns:
            ``[B, H, N, D]`` (a transposed view of a contiguous ``[B, N, H, D]`` tensor). The layer's matching-loss
            terms go to ``get_matching_loss`` of the model that holds this module.
        """
        selection, terms, _ = self.select(x)
        record_loose(self, terms)
        tokens = self.prompt_tokens(x.shape[0])
        shared = tokens.dim() == 2
        prompt_k, prompt_v = project_kv(tokens[None] if shared else tokens)  # [1 or B, H, P, D] each
        lead, P, H, D = 1 if shared else tokens.shape[0], tokens.shape[-2], q.shape[1], q.shape[3]
        for name, t in (("project_kv(prompts)[0]", prompt_k), ("project_kv(prompts)[1]", prompt_v)):
            if tuple(t.shape) != (lead, H, P, D):
                raise ValueError(f"{name}: expected the prompts' keys/values [{lead}, {H}, {P}, {D}] (heads of q), "
                                 f"got {describe(t)}")
        prompt_kv = torch.stack([prompt_k, prompt_v], dim=1)  # [1 or B, 2, H, P, D]
        if prompt_kv.dtype not in (q.dtype, torch.float32):  # the kernels read prompts in q's dtype or fp32
            prompt_kv = prompt_kv.to(q.dtype)
        return self.attend(q, k, v, prompt_kv[0] if shared else prompt_kv, selection, scale)


def fusable_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the last dim whose parameters are frozen: the matching kernels can apply it. (Read through
    the parameter dict: a block checks it at every call.)"""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    weight, bias = norm._parameters["weight"], norm._parameters["bias"]
    return not ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))


def prompt_modules(model: nn.Module) -> list[TCPAPrompts]:
    return [m for m in model.modules() if isinstance(m, TCPAPrompts)]
