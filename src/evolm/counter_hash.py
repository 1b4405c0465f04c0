"""Counter-based random bits: each value a pure function of an integer counter and a key, on any device.

Exact integer arithmetic (no int64 overflow), so a CPU and a GPU draw the same bits, and the Triton twins
below compute the same operations inside a kernel (the tests check every bit agrees). ES noise
(`evolm.es.noise`) and the engine's sampling (`evolm.engine.sampling`) both draw from here: neither stores
its random numbers, and neither depends on the order in which they are drawn.
"""

from __future__ import annotations

import torch

from evolm.kernels import tl, triton  # noqa: F401 (Triton resolves `tl` in a kernel's module)

MASK32 = 0xFFFFFFFF


def mul32(x: torch.Tensor | int, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without ever overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + ((high * (c & 0xFFFF)) << 16)) & MASK32


def mix32(x):
    """A bijective 32-bit integer hash with good avalanche (Wellons' lowbias32 constants)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*words: int) -> tuple[int, int]:
    """Two 32-bit keys derived from any number of non-negative integers (seed, generation, pair…)."""
    a, b = 0x243F6A88, 0x85A308D3
    for w in words:
        for part in (w & MASK32, (w >> 32) & MASK32):
            a = mix32(a ^ part)
            b = mix32(b ^ mix32(part ^ 0x13198A2E))
    return a, b


def uniform_bits(counters: torch.Tensor, key) -> torch.Tensor:
    """32 random bits per counter (0 <= counter < 2**63) of the stream `key`: a pair of 32-bit ints, or of
    int64 tensors that broadcast against `counters` (one stream per row)."""
    k1, k2 = key
    low, high = counters & MASK32, counters >> 32
    h = mix32(low ^ k1)
    h = mix32(h ^ high ^ k2)
    return mix32(h ^ k1 ^ 0x9E3779B9)


if triton is not None:

    @triton.jit
    def mul32_kernel(x, c):
        """mul32 on int64 values: the same splits, so no product leaves int64's range."""
        return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & 0xFFFFFFFF

    @triton.jit
    def mix32_kernel(x):
        """mix32, line for line: Triton code cannot call the PyTorch one."""
        x = x ^ (x >> 16)
        x = mul32_kernel(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = mul32_kernel(x, 0x846CA68B)
        return x ^ (x >> 16)

    @triton.jit
    def uniform_bits_kernel(counters, k1, k2):
        """uniform_bits on int64 counters and keys."""
        h = mix32_kernel((counters & 0xFFFFFFFF) ^ k1)
        h = mix32_kernel(h ^ (counters >> 32) ^ k2)
        return mix32_kernel(h ^ k1 ^ 0x9E3779B9)
