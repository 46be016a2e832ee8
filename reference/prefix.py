"""Official-style TCPA on any ViT block family (docs/how-it-works.md, 'Pools and prompts' to 'In a ViT block'), written
independently of ``tcpa_kernels``.

The published code concatenates each layer's prompts into the sequence and runs the block's ordinary attention over
``[prompts ; tokens]`` with a dense ``[B, 1, P+N, P+N]`` mask. ``prefix_prompts`` does exactly that to the blocks of
a plain (unpatched) model through forward hooks: before a block runs, its input ``x [B, N, C]`` is matched against
the layer's keys (``match_prompts_ref``), the prompts ``[P, C]`` are put in front of it, and the block's own
forward (its norms, projections, rotary embedding, MLP) runs on ``[B, P+N, C]`` with the mask as ``attn_mask``;
the block's output is its last N tokens. Prompts are prefix tokens: attention modules that skip their first
``num_prefix_tokens`` tokens when rotating (timm EVA) skip the prompts too.

Masks: ``renormalize=True`` passes a bool mask to the family's own ``scaled_dot_product_attention`` (an ordinary
masked softmax). ``renormalize=False`` (the published method) multiplies the softmax by a float {0, 1} mask; no
attention kernel does that, so ``dense_sdpa`` stands in for ``torch.nn.functional.scaled_dot_product_attention``
while the hooks are active.

VFPT prompts (docs/how-it-works.md, 'Fourier prompts') as the published code writes them: ``fft(fft(prompts, dim=-1),
dim=-2).real`` of each layer's prompts after dropout (``fourier_prompts_ref``).
"""

import contextlib

import torch
import torch.nn.functional as F

from reference.matching import match_prompts_ref


def dense_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Eager attention whose float mask multiplies the probabilities after the softmax (the published code).
    q [B, H, S, D], k/v [B, Hkv, S, D] -> [B, H, S, D]."""
    assert dropout_p == 0.0 and not is_causal, "the reference runs in eval mode without causal masks"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    probs = (scale * q @ k.transpose(-1, -2)).softmax(dim=-1)  # [B, H, S, S]
    if attn_mask is not None:
        probs = probs * attn_mask
    return probs @ v


def fourier_prompts_ref(prompts, fraction):
    """prompts [..., P, C]: the first int(P * fraction) become fft(fft(., dim=-1), dim=-2).real of themselves."""
    num_fourier = int(prompts.shape[-2] * fraction)
    fourier = torch.fft.fft(torch.fft.fft(prompts[..., :num_fourier, :], dim=-1), dim=-2).real
    return torch.cat([fourier, prompts[..., num_fourier:, :]], dim=-2)


def layer_tokens(prompts, multiplier, prompt_transform, fourier_fraction):
    """A layer's prompts [P, C] times its dropout multiplier (None: no dropout; [P, C] one mask for the batch,
    [B, P, C] one per sample; entries 0 or 1/(1-p)), then the prompt transform: [P, C] or [B, P, C]."""
    tokens = prompts if multiplier is None else prompts * multiplier
    return fourier_prompts_ref(tokens, fourier_fraction) if prompt_transform == "fourier" else tokens


def dense_mask(prompt_mask, renormalize):
    """[B, N, P] selection -> the [B, 1, P+N, P+N] attention mask over [prompts ; tokens] (prompt rows: all keys)."""
    B, N, P = prompt_mask.shape
    keep = torch.ones(B, P + N, P + N, dtype=torch.bool, device=prompt_mask.device)
    keep[:, P:, :P] = prompt_mask
    return keep[:, None] if renormalize else keep[:, None].double()


def pass_attn_mask(rest, kwargs, mask):
    """How a timm block takes the mask: ``block(x, ..., attn_mask=mask)``."""
    return rest, kwargs | {"attn_mask": mask}


@contextlib.contextmanager
def prefix_hooks(blocks, layer_inputs, *, post_softmax_mask=False, pass_mask=pass_attn_mask):
    """While active, block i of ``blocks`` runs on [prompts ; x] with the mask given by ``layer_inputs[i](x)``
    -> (prompts [P, C] or [B, P, C], mask over [P+N] x [P+N] or None); its output is its last N tokens.
    ``pass_mask(rest, kwargs, mask)`` -> (rest, kwargs) puts the mask into the block's arguments after x. With
    ``post_softmax_mask`` the masks multiply the softmax (``dense_sdpa``). The blocks must be in eval mode."""
    handles, saved = [], []
    for blk, layer_input in zip(blocks, layer_inputs, strict=True):
        counted = [m for m in blk.modules() if isinstance(getattr(m, "num_prefix_tokens", None), int)]  # RoPE attn
        fused = [m for m in blk.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
        saved += [(m, "num_prefix_tokens", m.num_prefix_tokens) for m in counted]
        saved += [(m, "fused_attn", m.fused_attn) for m in fused]
        for m in fused:
            m.fused_attn = True  # the SDPA call, which dense_sdpa can stand in for
        num_prompts = []

        def before(module, args, kwargs, layer_input=layer_input, counted=counted, num_prompts=num_prompts):
            x, *rest = args
            prompts, mask = layer_input(x)
            num_prompts[:] = [prompts.shape[-2]]
            for m, prefix in zip(counted, [m.num_prefix_tokens for m in counted]):
                m.num_prefix_tokens = prefix + prompts.shape[-2]  # set back after this block's forward
            seq = torch.cat([prompts.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, P+N, C]
            rest, kwargs = pass_mask(rest, kwargs, mask)
            return (seq, *rest), kwargs

        def after(module, args, kwargs, out, counted=counted, num_prompts=num_prompts):
            for m in counted:
                m.num_prefix_tokens -= num_prompts[0]
            return out[:, num_prompts[0]:]

        handles.append(blk.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(blk.register_forward_hook(after, with_kwargs=True))
    original_sdpa = F.scaled_dot_product_attention
    if post_softmax_mask:
        F.scaled_dot_product_attention = dense_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for handle in handles:
            handle.remove()
        for m, name, value in saved:
            setattr(m, name, value)


@contextlib.contextmanager
def prefix_prompts(blocks, layer_params, *, topk_cls, topk_img, prompt_len_cls=1, prompt_len_img=1,
                   num_prefix_tokens=1, renormalize=False, prompt_transform="none", fourier_fraction=1.0,
                   dropout=None, make_mask=None, pass_mask=pass_attn_mask):
    """TCPA: while active, block i of ``blocks`` runs on [prompts_i ; x] with the TCPA mask of x.

    layer_params[i] = (keys_cls [Pc, C], keys_img [Pi, C], prompts_cls [Pc, Lc, C], prompts_img [Pi, Li, C]).
    ``dropout[i]``: layer i's prompt-dropout multiplier (see ``layer_tokens``), None for none; the prompt transform
    ("none" | "fourier", with ``fourier_fraction``) follows the dropout.
    ``make_mask(selection [B, N, P], block, x)``: the mask in the block's convention (default ``dense_mask``);
    ``pass_mask``: as in ``prefix_hooks``. Yields a list that receives each layer's matching loss in order.
    """
    losses = []
    match_kw = dict(topk_cls=topk_cls, topk_img=topk_img, prompt_len_cls=prompt_len_cls,
                    prompt_len_img=prompt_len_img, num_prefix_tokens=num_prefix_tokens)

    make_mask = make_mask or (lambda selection, blk, x: dense_mask(selection, renormalize))

    def layer_input(blk, multiplier, keys_cls, keys_img, prompts_cls, prompts_img):
        prompts = torch.cat([prompts_cls.flatten(0, 1), prompts_img.flatten(0, 1)])  # [P, C]

        def make(x):
            selection, loss = match_prompts_ref(x, keys_cls, keys_img, **match_kw)
            losses.append(loss)
            return layer_tokens(prompts, multiplier, prompt_transform, fourier_fraction), make_mask(selection, blk, x)

        return make

    dropout = [None] * len(blocks) if dropout is None else dropout
    inputs = [layer_input(blk, multiplier, *params)
              for blk, multiplier, params in zip(blocks, dropout, layer_params, strict=True)]
    with prefix_hooks(blocks, inputs, post_softmax_mask=not renormalize, pass_mask=pass_mask):
        yield losses


def deep_vpt_prompts(blocks, layer_prompts, *, prompt_transform="none", fourier_fraction=1.0):
    """VPT-deep (VFPT with ``prompt_transform="fourier"``): while active, block i runs on [prompts_i ; x] (prompts
    [P, C] after the transform, queries too, no mask)."""
    tokens = [layer_tokens(prompts, None, prompt_transform, fourier_fraction) for prompts in layer_prompts]
    return prefix_hooks(blocks, [lambda x, p=t: (p, None) for t in tokens])
