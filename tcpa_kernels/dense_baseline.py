"""The published implementation's TCPA on timm's pre-norm ``Block``: the baseline the fused path is measured against
(docs/how-it-works.md, 'Targets', "official-style"). Benchmarks, the profiling CLI and tests use it; it is not a mode of
the fused path.

What the published code does in every layer: a matching-score tensor ``[B, N, Pc+Pi]``, its top-k and the loss from
it; the layer's prompt tokens concatenated in front of the sequence and projected with it; eager attention over
``[P+N] x [P+N]`` and a dense ``[B, H, P+N, P+N]`` float mask multiplied after the softmax (``-inf`` before it with
``renormalize=True``). Same parameters and math as ``apply_tcpa``: a model made here saves prompts that
``load_prompts`` loads into a fused model.
"""

import torch
from timm.models.vision_transformer import Block
from torch import nn

from tcpa_kernels._backend import resolve_backend
from tcpa_kernels._forward import hand_on, join_forward, record_terms
from tcpa_kernels._patch import original_class, register_mixin, unwrap
from tcpa_kernels.integrations.family import reject_attn_mask
from tcpa_kernels.integrations.models import model_family
from tcpa_kernels.integrations.timm_vit import attention_heads, attention_output
from tcpa_kernels.ops._function import topk_bits_op
from tcpa_kernels.ops.match_prompts import loss_from_words, match_scores
from tcpa_kernels.vit import TCPAConfig, attach_tcpa


def dense_attention(blk: nn.Module, h: torch.Tensor, selection, prompts: torch.Tensor, renormalize: bool):
    """Official-style TCPA attention: prompts ([P, C] or [B, P, C]) concatenated into the sequence, eager softmax
    over [P+N] x [P+N], a dense float mask [B, H, P+N, P+N] multiplied after it (or -inf before it when
    renormalize). Returns the output of the N real tokens [B, N, C]."""
    B, N, _ = h.shape
    P = prompts.shape[-2]
    seq = torch.cat([blk.norm1(prompts).expand(B, -1, -1).to(h.dtype), h], dim=1)  # [B, P+N, C]
    q, k, v = attention_heads(blk.attn, seq)  # [B, H, P+N, D]
    scores_qk = (q * blk.attn.scale) @ k.transpose(-1, -2)  # [B, H, P+N, P+N]
    dense_mask = torch.ones(B, blk.attn.num_heads, P + N, P + N, dtype=scores_qk.dtype, device=h.device)
    dense_mask[:, :, P:, :P] = selection.rows(0, N, P)[:, None].to(dense_mask.dtype)
    if renormalize:
        probs = scores_qk.masked_fill(dense_mask == 0, float("-inf")).softmax(-1)
    else:
        probs = scores_qk.softmax(-1) * dense_mask
    return (probs @ v)[:, :, P:].transpose(1, 2).reshape(B, N, -1)


@register_mixin
class DenseTCPAMixin:
    """timm pre-norm ``Block`` running the published dense-mask TCPA. x [B, N, C] -> [B, N, C]."""

    def forward(self, x, attn_mask=None, is_causal=False):
        reject_attn_mask(attn_mask, is_causal)
        layer, prompts = self._prompt_layer, self.tcpa
        cfg = layer.state.config
        fwd, record = join_forward(x, layer)
        if prompts.selection_mode == "topk":  # the published matching: a scores tensor, its top-k, the loss from it
            n_pre = prompts.num_prefix_tokens
            scores = match_scores(x, prompts.keys_cls, prompts.keys_img)  # [B, N, Pc+Pi]
            bits = topk_bits_op(scores.detach(), None, n_pre, cfg.pool_size_cls, cfg.topk_cls, cfg.topk_img,
                                resolve_backend(cfg.backend, x.device))
            selection, terms = prompts.selection(bits), loss_from_words(scores, bits, n_pre, cfg.topk_cls,
                                                                      cfg.topk_img)[None]
        else:
            selection, terms, _ = prompts.select(x)
        record_terms(record, layer.index, terms)
        h = self.norm1(x)
        out = dense_attention(self, h, selection, prompts.prompt_tokens(x.shape[0]), cfg.renormalize)  # [B, N, C]
        x = x + self.drop_path1(self.ls1(attention_output(self.attn, out, h)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return hand_on(x, fwd, record)


def supports(model: nn.Module) -> bool:
    """Whether the dense baseline can run on ``model``: a timm ViT of pre-norm ``Block``s."""
    model = unwrap(model)
    models = model_family(model)
    return models is not None and all(original_class(blk) is Block for blk in models.blocks(model))


def apply_dense_tcpa(model: nn.Module, **config) -> nn.Module:
    """The published dense-mask TCPA on a timm ViT of pre-norm ``Block``s, in place: ``apply_tcpa``'s arguments,
    pools and parameters."""
    if not supports(model):
        raise TypeError(f"model: the published dense-mask baseline is implemented for timm ViTs of pre-norm Blocks "
                        f"only, got {type(model).__name__}; use apply_tcpa")
    return attach_tcpa(model, TCPAConfig(**config), DenseTCPAMixin)
