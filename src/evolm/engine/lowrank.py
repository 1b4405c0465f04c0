"""A member group's perturbation added to its rows' matmul output: y[g] += t[g] · B[g], one pass over y.

Every perturbed matmul of the fused backend ends with this product (t = x·A, rank r a projection, B the
members' up factors), and it reads and rewrites the whole output: at 6,000 decoding rows the gate|up output is
200 MB a layer. `torch.baddbmm_` does it as a batched GEMM whose inner dimension is only 8–24, a shape
cuBLAS is not made for (round five measured the perturbation at 1.6 µs of a row-token's 11.5, twice what its
bytes cost at the card's copy rate, docs/benchmarks.md). On a GPU a Triton kernel tiles y, multiplies each
tile's t rows by its B columns on the tensor cores (one tile of B serves a whole tile of rows) and adds them
in float32 before the one rounding, as baddbmm_ does. Elsewhere, and as the kernel's reference, baddbmm_.
The engine runs the kernel only where KERNEL is set (the tests set it, and run it interpreted).
"""

from __future__ import annotations

import torch

from evolm.kernels import tl, triton, use_kernel

BLOCK_ROWS, BLOCK_COLUMNS = 64, 128  # a tile of y per kernel program
KERNEL = False  # opt-in: on an H200 it saved 2-4 % of the perturbed matmuls (docs/benchmarks.md), no more


def add_lowrank_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y [G, M, N] += t [G, M, R] @ b [G, R, N], in place; y is returned. The last dimension of each must be
    contiguous (views of whole rows, as the backend's are)."""
    if not (KERNEL and use_kernel(y)) or any(x.stride(-1) != 1 for x in (y, t, b)):
        return y.baddbmm_(t, b)
    groups, rows, columns = y.shape
    rank = t.shape[-1]
    grid = (groups, triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(columns, BLOCK_COLUMNS))
    _add_lowrank_kernel[grid](
        y, t, b, rows, columns, rank, y.stride(0), y.stride(1), t.stride(0), t.stride(1), b.stride(0), b.stride(1),
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLUMNS, RANK_PAD=max(16, triton.next_power_of_2(rank)),
        WIDEN=y.dtype == torch.float32 or not y.is_cuda,
    )
    return y


if triton is not None:

    @triton.jit
    def _add_lowrank_kernel(Y, T, B, rows, columns, rank, sy_g, sy_m, st_g, st_m, sb_g, sb_r,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr,
                            WIDEN: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, RANK_PAD)
        in_rows, in_columns, in_rank = m < rows, n < columns, r < rank
        t = tl.load(T + g * st_g + m[:, None].to(tl.int64) * st_m + r[None, :],
                    mask=in_rows[:, None] & in_rank[None, :], other=0.0)
        b = tl.load(B + g * sb_g + r[:, None] * sb_r + n[None, :], mask=in_rank[:, None] & in_columns[None, :],
                    other=0.0)
        if WIDEN:  # float32 factors stay float32, and the interpreter's bf16 dot multiplies raw bits: widen
            product = tl.dot(t.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            product = tl.dot(t, b)  # bf16 factors on the tensor cores, float32 sums
        inside = in_rows[:, None] & in_columns[None, :]
        target = Y + g * sy_g + m[:, None].to(tl.int64) * sy_m + n[None, :]
        y = tl.load(target, mask=inside, other=0.0)
        tl.store(target, (y.to(tl.float32) + product).to(y.dtype), mask=inside)
