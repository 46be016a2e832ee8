"""Official-style TCPA on Hugging Face ``transformers`` layers, written independently of ``tcpa_kernels``.

The ``reference.prefix`` construction for layers called as ``layer(hidden_states, attention_mask, **kwargs)``:
while ``prefix_prompts_hf`` is active, each layer's input ``x [B, N, C]`` is matched against the layer's keys
(``match_prompts_ref``), the prompts ``[P, C]`` are put in front of it and the layer's own forward (its norms,
projections, MLP) runs on ``[B, P+N, C]`` with the TCPA mask as its ``attention_mask``; the layer's output is its
last N tokens.

The layers must use ``attn_implementation="sdpa"``: ``renormalize=True`` passes a bool mask to torch's
``scaled_dot_product_attention`` (a masked softmax); ``renormalize=False`` (the published method) passes a float
{0, 1} mask that ``reference.prefix.dense_sdpa``, standing in for it while the hooks are active, multiplies into the
softmax.
"""

from reference.prefix import prefix_prompts


def pass_attention_mask(rest, kwargs, mask):
    """How a transformers layer takes the mask: ``layer(hidden_states, attention_mask, **kwargs)``."""
    assert (rest[0] if rest else kwargs.get("attention_mask")) is None, "the reference takes no user mask"
    return (mask, *rest[1:]), {name: value for name, value in kwargs.items() if name != "attention_mask"}


def prefix_prompts_hf(layers, layer_params, **kwargs):
    """``prefix_prompts`` for transformers layers (the TCPA mask as their ``attention_mask``); ``kwargs`` as there."""
    return prefix_prompts(layers, layer_params, **kwargs, pass_mask=pass_attention_mask)
