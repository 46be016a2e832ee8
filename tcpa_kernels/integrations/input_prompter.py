"""The input prompter of the published TCPA recipe: a trainable image-space prompt added to the image before the
patch embedding (the released CUB configuration of the TCPA code, arXiv 2505.02406).

``apply_tcpa(model, input_prompter=True)`` (or ``apply_vpt``) gives the module that first takes the image (the
model family's ``patch_embedding``: timm ``patch_embed``, a Hugging Face model's ``embeddings.patch_embeddings`` /
``embeddings.patch_embedding``, open_clip's ``visual.conv1``) an ``input_prompter`` submodule and swaps its class to
a generated subclass (``_patch.py``) whose forward runs the prompter on the image, then its own forward. The
prompter's parameters are named after the patch embedding (``patch_embed.input_prompter.conv1.weight`` ...), train
with the prompts and are saved with them; ``remove_prompts`` takes the submodule and the class swap back.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tcpa_kernels._patch import original_class, prompted_class, register_mixin
from tcpa_kernels._validate import check_int

ATTRIBUTE = "input_prompter"  # the patch embedding's submodule
PARAMETERS = ("conv1.weight", "conv1.bias", "prelu.weight", "conv2.weight", "conv2.bias")  # an InputPrompter's


class InputPrompter(nn.Module):
    """``x + conv2(prelu(conv1(x)))`` on an image x ``[B, C, H, W]``: the published prompter (C = 3: 3 -> 9 -> 3
    channels, 11 x 11 kernels with "same" padding, biases, one PReLU slope), PyTorch's default initialisation.

    Args:
        channels: the image's channels C.
        hidden_channels: conv1's output channels (the published 9).
        kernel_size: odd side of both kernels (the published 11); padding ``kernel_size // 2`` keeps H and W.
    """

    def __init__(self, channels: int = 3, hidden_channels: int = 9, kernel_size: int = 11) -> None:
        super().__init__()
        check_int("channels", channels, 1)
        check_int("hidden_channels", hidden_channels, 1)
        check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int ('same' padding keeps H and W), got {kernel_size}")
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, hidden_channels, kernel_size, padding=padding)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prelu(self.conv1(x))  # [B, C, H, W] -> [B, hidden, H, W]
        return x + self.conv2(h)  # [B, hidden, H, W] -> [B, C, H, W], added to the image


class TaskInputPrompters(nn.Module):
    """The input prompters of a prompt bank's tasks, run per sample: image b through the prompter of its task
    ``tasks[b]``, as :class:`InputPrompter` runs it. ``prompters``: per task its prompter's tensors by name
    (``PARAMETERS``), or None for a task without one (its images pass unchanged, and its zero slots get no gradient).

    Parameters ``[T, ...]`` of each prompter tensor (``conv1_weight [T, hidden, C, k, k]`` ...). The forward gathers
    each sample's weights (a few thousand numbers per sample) and runs each convolution once for the batch, grouped
    by sample (``groups=B``)."""

    def __init__(self, prompters: list[dict[str, torch.Tensor] | None]):
        super().__init__()
        first = next(p for p in prompters if p is not None)
        for name in PARAMETERS:
            stacked = torch.stack([first[name].new_zeros(first[name].shape) if p is None else p[name]
                                   for p in prompters])
            self.register_parameter(name.replace(".", "_"), nn.Parameter(stacked))
        self.has_prompter = [p is not None for p in prompters]
        self.register_buffer("present", torch.tensor(self.has_prompter, device=first["conv1.weight"].device),
                             persistent=False)

    def task(self, t: int) -> dict[str, torch.Tensor] | None:
        """Task t's prompter tensors by name (views), or None where it has none."""
        if not self.has_prompter[t]:
            return None
        return {name: getattr(self, name.replace(".", "_"))[t] for name in PARAMETERS}

    def forward(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], tasks int64 [B] -> [B, C, H, W]."""
        B, C, H, W = images.shape
        if B == 0:
            return images
        w1 = self.conv1_weight[tasks]  # [B, hidden, C, k, k]
        hidden, pad = w1.shape[1], w1.shape[-1] // 2
        h = F.conv2d(images.reshape(1, B * C, H, W), w1.flatten(0, 1), self.conv1_bias[tasks].flatten(), padding=pad,
                     groups=B)  # [1, B * hidden, H, W]
        h = F.prelu(h, self.prelu_weight[tasks].expand(B, hidden).flatten())
        out = F.conv2d(h, self.conv2_weight[tasks].flatten(0, 1), self.conv2_bias[tasks].flatten(), padding=pad,
                       groups=B).view(B, C, H, W)
        return images + out * self.present[tasks].to(out.dtype)[:, None, None, None]


@register_mixin
class InputPromptedMixin:
    """A patch embedding with the input prompter in front: image ``[B, C, H, W]`` -> ``input_prompter`` -> its own
    forward (further arguments passed on)."""

    def forward(self, x, *args, **kwargs):
        return super().forward(self.input_prompter(x), *args, **kwargs)


def image_channels(patch_embedding: nn.Module) -> int:
    """The image channels a patch embedding takes: its first ``Conv2d``'s input channels (3 if it has none)."""
    conv = next((m for m in patch_embedding.modules() if isinstance(m, nn.Conv2d)), None)
    return 3 if conv is None else conv.in_channels


def attach_input_prompter(patch_embedding: nn.Module, like: torch.Tensor) -> InputPrompter:
    """Give ``patch_embedding`` a new :class:`InputPrompter` (on ``like``'s device and dtype) and run it first;
    returns the prompter."""
    channels = image_channels(patch_embedding)
    prompter = InputPrompter(channels, 3 * channels)  # the published 3 -> 9 -> 3 for RGB
    patch_embedding.add_module(ATTRIBUTE, prompter.to(device=like.device, dtype=like.dtype))
    patch_embedding.__class__ = prompted_class(InputPromptedMixin, type(patch_embedding))
    return prompter


def detach_input_prompter(patch_embedding: nn.Module) -> None:
    """Undo ``attach_input_prompter`` (also a partial one)."""
    patch_embedding._modules.pop(ATTRIBUTE, None)
    patch_embedding.__class__ = original_class(patch_embedding)


def input_prompter_of(patch_embedding: nn.Module | None) -> InputPrompter | None:
    """The input prompter a patch embedding holds (None: none, or no patch embedding)."""
    return None if patch_embedding is None else patch_embedding._modules.get(ATTRIBUTE)
