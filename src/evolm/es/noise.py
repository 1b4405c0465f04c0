"""Counter-based Gaussian noise: never stored, regenerated from (seed, generation, pair) on any device.

Each element is a pure function of its integer counter and the key, computed with exact
integer arithmetic (no overflow in int64), so CPU and GPU draw the same uniforms; the
Box-Muller transform runs in float64 and is rounded to float32.

On a GPU one Triton kernel computes the same integer operations in one pass: as PyTorch ops the hash
is some 150 passes over int64 tensors, which made drawing the dense space's noise (1.3 G elements a
member for a 1.5B model) a third of an ES generation (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch

from evolm.kernels import tl, triton, use_kernel

BLOCK = 1024  # elements per kernel program

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
    out = torch.empty(count, dtype=torch.float32, device=device)
    if use_kernel(out) and count:
        _gaussian_kernel[(triton.cdiv(count, BLOCK),)](out, start, count, key[0], key[1], BLOCK=BLOCK)
        return out
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    u1 = (_uniform_bits(2 * index, key).double() + 1.0) / 2.0**32  # (0, 1]: log is finite
    u2 = _uniform_bits(2 * index + 1, key).double() / 2.0**32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()


if triton is not None:

    @triton.jit
    def _mul32_kernel(x, c):
        """_mul32 on int64 values: the same splits, so no product leaves int64's range."""
        return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & 0xFFFFFFFF

    @triton.jit
    def _mix32_kernel(x):
        """_mix32, line for line: Triton code cannot call the PyTorch one (the tests check every bit agrees)."""
        x = x ^ (x >> 16)
        x = _mul32_kernel(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32_kernel(x, 0x846CA68B)
        return x ^ (x >> 16)

    @triton.jit
    def _uniform_bits_kernel(counters, k1, k2):
        h = _mix32_kernel((counters & 0xFFFFFFFF) ^ k1)
        h = _mix32_kernel(h ^ (counters >> 32) ^ k2)
        return _mix32_kernel(h ^ k1 ^ 0x9E3779B9)

    @triton.jit
    def _gaussian_kernel(Out, start, count, k1, k2, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        index = start + offsets
        k1, k2 = k1.to(tl.int64), k2.to(tl.int64)
        u1 = (_uniform_bits_kernel(2 * index, k1, k2).to(tl.float64) + 1.0) / 4294967296.0
        u2 = _uniform_bits_kernel(2 * index + 1, k1, k2).to(tl.float64) / 4294967296.0
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        tl.store(Out + offsets, z.to(tl.float32), mask=offsets < count)
