"""Counter-based Gaussian noise: never stored, regenerated from (seed, generation, pair) on any device.

Each element is a pure function of its integer counter and the key, computed with exact
integer arithmetic (no overflow in int64), so CPU and GPU draw the same uniforms; the
Box-Muller transform runs in float64 and is rounded to float32.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without ever overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + ((high * (c & 0xFFFF)) << 16)) & _MASK32


def _mix32(x):
    """A bijective 32-bit integer hash with good avalanche (Wellons' lowbias32 constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*words: int) -> tuple[int, int]:
    """Two 32-bit keys derived from any number of non-negative integers (seed, generation, pair…)."""
    a, b = 0x243F6A88, 0x85A308D3
    for w in words:
        for part in (w & _MASK32, (w >> 32) & _MASK32):
            a = _mix32(a ^ part)
            b = _mix32(b ^ _mix32(part ^ 0x13198A2E))
    return a, b


def _uniform_bits(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    k1, k2 = key
    low, high = counters & _MASK32, counters >> 32
    h = _mix32(low ^ k1)
    h = _mix32(h ^ high ^ k2)
    return _mix32(h ^ k1 ^ 0x9E3779B9)


def gaussian(key: tuple[int, int], start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements start .. start+count-1 of the standard normal stream `key`, as float32."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    u1 = (_uniform_bits(2 * index, key).double() + 1.0) / 2.0**32  # (0, 1]: log is finite
    u2 = _uniform_bits(2 * index + 1, key).double() / 2.0**32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()
