"""A layer's prompt tokens for one forward: prompt dropout, then the optional Fourier transform (docs/how-it-works.md,
'Fourier prompts').

The published VFPT+TCPA code expands each layer's prompts to the batch, drops them out per sample and replaces them
by ``fft(fft(prompts, dim=-1), dim=-2).real`` (Visual Fourier Prompt Tuning, "Fourier percentage" 1.0) before the
layer's ``norm1``. With a fraction f < 1 only the first ``floor(f * P)`` prompt tokens are transformed (among
themselves), the others pass unchanged, as in VFPT's code. The transform is linear and acts on each sample's
``[P, C]`` alone, so a prompt sequence shared by the batch is transformed once.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tcpa_kernels._validate import check_number

PROMPT_TRANSFORMS = ("none", "fourier")


def check_prompt_options(prompt_dropout: float, prompt_transform: str, fourier_fraction: float) -> None:
    check_number("prompt_dropout", prompt_dropout, lo=0.0, hi=1.0)
    if prompt_transform not in PROMPT_TRANSFORMS:
        raise ValueError(f"prompt_transform: expected one of {PROMPT_TRANSFORMS}, got {prompt_transform!r}")
    check_number("fourier_fraction", fourier_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=False)


def transform_prompts(prompts: Tensor, transform: str, fraction: float) -> Tensor:
    """prompts [..., P, C] -> [..., P, C]: "none" returns them; "fourier" replaces the first floor(fraction * P)
    tokens by the real part of their 2-D DFT over (tokens, channels). 16-bit inputs are transformed in fp32."""
    if transform == "none":
        return prompts
    num_fourier = math.floor(fraction * prompts.shape[-2])
    if num_fourier == 0:
        return prompts
    head = prompts[..., :num_fourier, :]
    exact = head if head.dtype in (torch.float32, torch.float64) else head.float()
    head = torch.fft.fft2(exact).real.to(prompts.dtype)  # fft2 over the last two dims = fft(fft(., -1), -2)
    return head if num_fourier == prompts.shape[-2] else torch.cat([head, prompts[..., num_fourier:, :]], dim=-2)


def drop_prompts(prompts: Tensor, p: float, training: bool, batch_size: int | None) -> Tensor:
    """Prompt dropout of prompts [..., P, C]: one mask for the batch (batch_size None) -> [..., P, C], or one per
    sample -> [..., B, P, C] (the prompts expanded to the batch first, as published)."""
    if batch_size is not None:
        prompts = prompts.unsqueeze(-3).expand(*prompts.shape[:-2], batch_size, *prompts.shape[-2:])
    return F.dropout(prompts, p, training=training)


def forward_tokens(prompts: Tensor, config, training: bool, batch_size: int | None) -> Tensor:
    """A TCPA layer's prompts [..., P, C] for one forward (``config``: a PoolConfig): prompt dropout, one mask per
    sample -> [..., B, P, C] when the config asks for it and a mask is drawn at all (training, p > 0), else one mask
    for the batch -> [..., P, C]; then the prompt transform. ``batch_size`` None: one mask over the whole tensor
    whatever the config (a prompt bank's per-sample prompt sets, which are per sample already)."""
    per_sample = batch_size is not None and config.prompt_dropout_per_sample and training and config.prompt_dropout > 0
    prompts = drop_prompts(prompts, config.prompt_dropout, training, batch_size if per_sample else None)
    return transform_prompts(prompts, config.prompt_transform, config.fourier_fraction)
