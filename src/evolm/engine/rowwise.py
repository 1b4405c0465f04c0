"""The row-wise pieces of a decoder layer, each one Triton kernel on a GPU: one pass over the rows, not five.

At a few thousand rows a decoding step spent a fifth of its time in small elementwise kernels (measured
on an H200, docs/benchmarks.md): RMSNorm as PyTorch runs it is six passes in float32, the rotary
embedding eight, SiLU·up three. Each kernel here reads its inputs once and writes once, rounding where
the PyTorch modules round (to the activations' dtype after each operation), so it computes what the
model's own modules compute. Elsewhere, and as the kernels' reference, the model's modules themselves.

    add_rms_norm      x + delta, and RMSNorm of that (the residual add fused into the next norm)
    silu_mul          SiLU(gate) · up from the concatenated gate|up projection
    rotary_to_cache   rotary q and k of one decoding step; k and v written straight into the KV cache

Each takes the members' low-rank term of the matmul output it consumes (LowRank) and adds it on the way
in, as baddbmm would (float32 sums, one rounding): an in-place baddbmm reads and rewrites the whole
output, a tenth of a perturbed decoding step at a few thousand rows (docs/benchmarks.md, round four).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evolm.kernels import tl, triton, use_kernel

# A program adds the low-rank term to up to this many rows of one group at once, so that one load of the
# group's B factor serves them all (a row a program would read K·out factor values for every row).
LOW_RANK_ROWS = 16
LOW_RANK_WARPS = 8  # warps a program that adds a term (without: Triton's 4)
NORM_TILE = 8192  # at most this many values in a program of add_rms_norm (rows × padded width): registers
SILU_BLOCK = 1024  # columns a program of silu_mul; with a term, LOW_RANK_ROWS rows of SILU_TERM_BLOCK columns
SILU_TERM_BLOCK = 64  # (a narrower tile costs no more factor reads: those depend on the rows a program only)


@dataclass
class LowRank:
    """The low-rank term of a matmul's output y [G·C, ..., out], rows group-major (C rows a group):
    y[row] += t[row] · up[row // C], added by the row kernel that consumes y (add_low_rank elsewhere)."""

    t: torch.Tensor  # [G, C, K], contiguous: the rows times their groups' A factors, in the activations' dtype
    up: torch.Tensor  # [G, K, out]: the groups' B factors (a captured CUDA graph reads this very tensor)


def add_low_rank(y: torch.Tensor, low_rank: LowRank | None) -> torch.Tensor:
    """y with the term added in place (what the kernels compute instead); None: y as it is."""
    if low_rank is not None:
        y.view(*low_rank.t.shape[:2], y.shape[-1]).baddbmm_(low_rank.t, low_rank.up)
    return y


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module,
                 low_rank: LowRank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)); delta None: (x, norm(x)). `norm` is a Llama-style RMSNorm module;
    `low_rank` is delta's term, added to delta first."""
    if not (use_kernel(x) and hasattr(norm, "variance_epsilon")):
        if delta is not None:
            x = x + add_low_rank(delta, low_rank)
        return x, norm(x)
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    normed = torch.empty_like(rows)
    summed = torch.empty_like(rows) if delta is not None else rows
    change = delta.reshape(-1, width) if delta is not None else rows
    block = triton.next_power_of_2(width)
    most_rows = max(1, min(LOW_RANK_ROWS, NORM_TILE // block))  # the whole width of every row in registers
    term, per_program, programs, warps = _low_rank_launch(low_rank, rows, most_rows)
    _add_rms_norm_kernel[(programs,)](
        rows, change, norm.weight, summed, normed, *term, width, norm.variance_epsilon,
        rows.stride(0), change.stride(0), summed.stride(0), normed.stride(0),
        HAS_DELTA=delta is not None, HAS_LOW_RANK=low_rank is not None, ROWS=per_program, BLOCK=block,
        num_warps=warps,
    )
    return summed.view(x.shape), normed.view(x.shape)


def silu_mul(gate_up: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
    """SiLU(gate) · up, where gate_up [..., 2·inner] holds gate then up (`low_rank`: gate_up's term)."""
    inner = gate_up.shape[-1] // 2
    if not use_kernel(gate_up):
        gate, up = add_low_rank(gate_up, low_rank).split(inner, dim=-1)
        return F.silu(gate) * up
    rows = gate_up.reshape(-1, 2 * inner)
    out = rows.new_empty((rows.shape[0], inner))
    term, per_program, programs, warps = _low_rank_launch(low_rank, rows, LOW_RANK_ROWS)
    block = SILU_BLOCK if low_rank is None else SILU_TERM_BLOCK
    _silu_mul_kernel[(programs, triton.cdiv(inner, block))](
        rows, out, *term, inner, rows.stride(0), out.stride(0),
        HAS_LOW_RANK=low_rank is not None, ROWS=per_program, BLOCK=block, num_warps=warps,
    )
    return out.view(*gate_up.shape[:-1], inner)


def rotary_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slots: torch.Tensor, position: torch.Tensor, heads: int,
                    low_rank: LowRank | None = None) -> torch.Tensor:
    """qkv [rows, (heads + 2·kv_heads)·dim] of a decoding step's rows (or a prefill's tokens, one row each)
    -> rotary q [rows, heads, dim].

    The rotary k and the v of row b are written to slot slots[b] at position[b] of the caches
    [slots, kv_heads, capacity, dim]; cos and sin are [rows, dim]; `low_rank` is qkv's term, added to
    q, k and v before anything else. Kernel only (see use_kernel).
    """
    rows = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
    q = qkv.new_empty((rows, heads, dim))
    term, per_program, programs, warps = _low_rank_launch(low_rank, qkv, LOW_RANK_ROWS)
    _rotary_to_cache_kernel[(programs, heads + 2 * kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, slots, position, *term,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2,
        HAS_LOW_RANK=low_rank is not None, ROWS=per_program, num_warps=warps,
    )
    return q


def _low_rank_launch(low_rank: LowRank | None, rows: torch.Tensor, most_rows: int) -> tuple[tuple, int, int, int]:
    """The kernels' arguments for a term (t, up, rows a group, K, t's row stride, up's strides), the rows
    of a program, how many programs cover the rows, and warps a program. No term: one group of all rows,
    one row a program, as many programs as rows, Triton's default warps."""
    if low_rank is None:
        return (rows, rows, rows.shape[0], 0, 0, 0, 0), 1, rows.shape[0], 4
    t, up = low_rank.t, low_rank.up
    groups, per_group, rank = t.shape
    per_program = min(most_rows, triton.next_power_of_2(per_group))
    arguments = (t, up, per_group, rank, t.stride(1), up.stride(0), up.stride(1))
    return arguments, per_program, groups * triton.cdiv(per_group, per_program), LOW_RANK_WARPS


if triton is not None:

    @triton.jit
    def _row_block(per_group, ROWS: tl.constexpr):
        """This program's rows (ROWS of one group, rows group-major), which of them exist, and their group."""
        blocks = (per_group + ROWS - 1) // ROWS
        program = tl.program_id(0)
        group = program // blocks
        within = (program % blocks) * ROWS + tl.arange(0, ROWS)
        return (group * per_group + within).to(tl.int64), within < per_group, group.to(tl.int64)

    @triton.jit
    def _plus_low_rank(value, T, Up, rows, rows_inside, group, cols, cols_inside, rank, st, su_group, su_k):
        """value [ROWS, COLS] + t[rows] · up[group][:, cols]: float32 sums, rounded once to value's dtype."""
        total = tl.zeros(value.shape, dtype=tl.float32)
        for k in range(rank):
            t = tl.load(T + rows * st + k, mask=rows_inside, other=0.0).to(tl.float32)
            u = tl.load(Up + group * su_group + k * su_k + cols, mask=cols_inside, other=0.0).to(tl.float32)
            total += t[:, None] * u[None, :]
        return (value.to(tl.float32) + total).to(value.dtype)

    @triton.jit
    def _add_rms_norm_kernel(X, Delta, Weight, Summed, Normed, T, Up, per_group, rank, st, su_group, su_k,
                             width, eps, sx, sd, ss, sn, HAS_DELTA: tl.constexpr, HAS_LOW_RANK: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, rows_inside, group = _row_block(per_group, ROWS)
        cols = tl.arange(0, BLOCK)
        cols_inside = cols < width
        inside = rows_inside[:, None] & cols_inside[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=inside, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded to the activations' dtype as x + delta is
            delta = tl.load(Delta + rows[:, None] * sd + cols[None, :], mask=inside, other=0.0)
            if HAS_LOW_RANK:
                delta = _plus_low_rank(delta, T, Up, rows, rows_inside, group, cols, cols_inside, rank, st,
                                       su_group, su_k)
            x = (x + delta.to(tl.float32)).to(dtype)
            tl.store(Summed + rows[:, None] * ss + cols[None, :], x, mask=inside)
            x = x.to(tl.float32)
        variance = tl.sum(x * x, axis=1) / width
        scaled = (x * (1.0 / tl.sqrt_rn(variance + eps))[:, None]).to(dtype).to(tl.float32)
        weight = tl.load(Weight + cols, mask=cols_inside, other=0.0).to(tl.float32)
        tl.store(Normed + rows[:, None] * sn + cols[None, :], (weight[None, :] * scaled).to(dtype), mask=inside)

    @triton.jit
    def _silu_mul_kernel(GateUp, Out, T, Up, per_group, rank, st, su_group, su_k, inner, sg, so,
                         HAS_LOW_RANK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, rows_inside, group = _row_block(per_group, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols_inside = cols < inner
        inside = rows_inside[:, None] & cols_inside[None, :]
        at = GateUp + rows[:, None] * sg + cols[None, :]
        gate = tl.load(at, mask=inside, other=0.0)
        up = tl.load(at + inner, mask=inside, other=0.0)
        if HAS_LOW_RANK:
            gate = _plus_low_rank(gate, T, Up, rows, rows_inside, group, cols, cols_inside, rank, st, su_group, su_k)
            up = _plus_low_rank(up, T, Up, rows, rows_inside, group, cols + inner, cols_inside, rank, st, su_group,
                                su_k)
        dtype = gate.dtype
        gate, up = gate.to(tl.float32), up.to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(Out + rows[:, None] * so + cols[None, :], (activated * up).to(dtype), mask=inside)

    @triton.jit
    def _rotary_to_cache_kernel(QKV, Cos, Sin, Q, KCache, VCache, Slots, Position, T, Up, per_group, rank, st,
                                su_group, su_k, s_qkv, s_cos, s_sin, sq_row, sq_head, sk_slot, sk_head, sk_pos,
                                sv_slot, sv_head, sv_pos, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                                HALF: tl.constexpr, HAS_LOW_RANK: tl.constexpr, ROWS: tl.constexpr):
        rows, rows_inside, group = _row_block(per_group, ROWS)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        d = tl.arange(0, HALF)
        every = d < HALF
        inside = rows_inside[:, None] & every[None, :]
        cols = head * (2 * HALF) + d
        base = QKV + rows[:, None] * s_qkv + cols[None, :]
        first = tl.load(base, mask=inside, other=0.0)
        second = tl.load(base + HALF, mask=inside, other=0.0)
        if HAS_LOW_RANK:
            first = _plus_low_rank(first, T, Up, rows, rows_inside, group, cols, every, rank, st, su_group, su_k)
            second = _plus_low_rank(second, T, Up, rows, rows_inside, group, cols + HALF, every, rank, st,
                                    su_group, su_k)
        dtype = first.dtype
        slot = tl.load(Slots + rows, mask=rows_inside, other=0).to(tl.int64)[:, None]
        position = tl.load(Position + rows, mask=rows_inside, other=0).to(tl.int64)[:, None]
        if head < HEADS + KV_HEADS:
            # q·cos + rotate_half(q)·sin, each product and the sum rounded as PyTorch rounds them
            cos_at = Cos + rows[:, None] * s_cos + d[None, :]
            sin_at = Sin + rows[:, None] * s_sin + d[None, :]
            cos_1 = tl.load(cos_at, mask=inside, other=0.0).to(tl.float32)
            cos_2 = tl.load(cos_at + HALF, mask=inside, other=0.0).to(tl.float32)
            sin_1 = tl.load(sin_at, mask=inside, other=0.0).to(tl.float32)
            sin_2 = tl.load(sin_at + HALF, mask=inside, other=0.0).to(tl.float32)
            x1, x2 = first.to(tl.float32), second.to(tl.float32)
            out_1 = ((x1 * cos_1).to(dtype).to(tl.float32) + (-x2 * sin_1).to(dtype).to(tl.float32)).to(dtype)
            out_2 = ((x2 * cos_2).to(dtype).to(tl.float32) + (x1 * sin_2).to(dtype).to(tl.float32)).to(dtype)
            if head < HEADS:
                target = Q + rows[:, None] * sq_row + head * sq_head
            else:
                target = KCache + slot * sk_slot + (head - HEADS) * sk_head + position * sk_pos
            tl.store(target + d[None, :], out_1, mask=inside)
            tl.store(target + HALF + d[None, :], out_2, mask=inside)
        else:
            target = VCache + slot * sv_slot + (head - HEADS - KV_HEADS) * sv_head + position * sv_pos
            tl.store(target + d[None, :], first, mask=inside)
            tl.store(target + HALF + d[None, :], second, mask=inside)
