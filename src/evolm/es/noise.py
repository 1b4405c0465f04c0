"""Counter-based Gaussian noise: never stored, regenerated from (seed, generation, pair) on any device.

Each element is a pure function of its integer counter and the key (`evolm.counter_hash`: exact integer
arithmetic, so CPU and GPU draw the same uniforms); the Box-Muller transform runs in float64 and is
rounded to float32.

On a GPU one Triton kernel computes the same integer operations in one pass: as PyTorch ops the hash
is some 150 passes over int64 tensors, which made drawing the dense space's noise (1.3 G elements a
member for a 1.5B model) a third of an ES generation (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch

from evolm.counter_hash import uniform_bits
from evolm.kernels import tl, triton, use_kernel

BLOCK = 1024  # elements per kernel program


def gaussian(key: tuple[int, int], start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements start .. start+count-1 of the standard normal stream `key`, as float32."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if use_kernel(out) and count:
        _gaussian_kernel[(triton.cdiv(count, BLOCK),)](out, start, count, key[0], key[1], BLOCK=BLOCK)
        return out
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    u1 = (uniform_bits(2 * index, key).double() + 1.0) / 2.0**32  # (0, 1]: log is finite
    u2 = uniform_bits(2 * index + 1, key).double() / 2.0**32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()


if triton is not None:
    from evolm.counter_hash import uniform_bits_kernel

    @triton.jit
    def _gaussian_kernel(Out, start, count, k1, k2, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        index = start + offsets
        k1, k2 = k1.to(tl.int64), k2.to(tl.int64)
        u1 = (uniform_bits_kernel(2 * index, k1, k2).to(tl.float64) + 1.0) / 4294967296.0
        u2 = uniform_bits_kernel(2 * index + 1, k1, k2).to(tl.float64) / 4294967296.0
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        tl.store(Out + offsets, z.to(tl.float32), mask=offsets < count)
