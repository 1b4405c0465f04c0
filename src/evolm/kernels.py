"""Triton where it runs: kernels for tensors on a GPU, or anywhere with TRITON_INTERPRET=1 (the tests run
every kernel by the interpreter on a CPU against the PyTorch code it replaces)."""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds of torch without the triton package
    triton = tl = None


def use_kernel(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
