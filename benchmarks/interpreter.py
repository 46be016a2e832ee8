"""Imported first by the scripts that run the kernels on CPU tensors (``backend="triton"`` without a GPU): turns the
Triton interpreter on where there is no CUDA, which works only before triton is first imported (timm imports it).
``tcpa_kernels`` itself never changes the environment."""

import os

import torch  # imports no triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
