"""An fp8 (e4m3) KV cache, opt-in (decoding.kv_cache_dtype = "fp8"): half the bytes the decode attention
reads, at the cost of exactness.

The cache holds value / scale as float8_e4m3fn, one scale per (layer, KV head) for the keys and one for the
values. A per-head scale costs the decode kernel nothing: a program reads one KV head, so it multiplies its
scores and its output by one number each. The scales come from the backend's first prefill: the largest
magnitude a head's keys (values) reach there, times HEADROOM, over e4m3's largest value (448). e4m3 is a
floating-point format, so the headroom costs no relative precision, only range at the small end; anything
beyond it saturates at ±448 (clamped on every write, so nothing becomes NaN). Qwen2.5's keys carry large
channels from k_proj's bias, the same at every position, which that first prefill already sees.

The scales stay fixed for the backend's life: keys copied from slot to slot (a shared prefix) need no
rescaling, and a captured CUDA graph reads the same scales on every replay. A completion therefore depends on
the backend's first prefill as well as on its own row. Every function here takes the KV-head axis as axis 1
([rows, kv_heads, ...]), as the caches and the prefill's keys have it.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
HEADROOM = 4.0  # the first prefill's largest magnitude may grow fourfold before it saturates
SMALLEST_SCALE = 1e-12  # a head whose first prefill was all zeros: its later values saturate, never divide by 0


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """[kv_heads] float32 scales for values like x [rows, kv_heads, ...]."""
    amax = x.detach().abs().amax(dim=[d for d in range(x.dim()) if d != 1]).float()
    return (amax * HEADROOM / FP8_MAX).clamp(min=SMALLEST_SCALE)


def quantise(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, kv_heads, ...] as fp8 under `scale` [kv_heads], saturating."""
    return (x.float() / _per_head(scale, x)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantise(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 x [rows, kv_heads, ...] back to values of `dtype`."""
    return (x.float() * _per_head(scale, x)).to(dtype)


def _per_head(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *(1,) * (x.dim() - 2))
