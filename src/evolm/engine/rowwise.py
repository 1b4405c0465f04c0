"""The row-wise pieces of a decoder layer, each one Triton kernel on a GPU: one pass over the rows, not five.

At a few thousand rows a decoding step spent a fifth of its time in small elementwise kernels (measured
on an H200, docs/benchmarks.md): RMSNorm as PyTorch runs it is six passes in float32, the rotary
embedding eight, SiLU·up three. Each kernel here reads its inputs once and writes once, rounding where
the PyTorch modules round (to the activations' dtype after each operation), so it computes what the
model's own modules compute. Elsewhere, and as the kernels' reference, the model's modules themselves.

    add_rms_norm      x + delta, and RMSNorm of that (the residual add fused into the next norm)
    silu_mul          SiLU(gate) · up from the concatenated gate|up projection
    rotary_to_cache   rotary q and k of one decoding step; k and v written straight into the KV cache
                      (quantised on the way for an fp8 cache, engine/kv_quant.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evolm.engine.kv_quant import FP8_MAX
from evolm.kernels import tl, triton, use_kernel


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)); delta None: (x, norm(x)). `norm` is a Llama-style RMSNorm module."""
    if not (use_kernel(x) and hasattr(norm, "variance_epsilon")):
        if delta is not None:
            x = x + delta
        return x, norm(x)
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    normed = torch.empty_like(rows)
    summed = torch.empty_like(rows) if delta is not None else rows
    change = delta.reshape(-1, width) if delta is not None else rows
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, change, norm.weight, summed, normed, width, norm.variance_epsilon,
        rows.stride(0), change.stride(0), summed.stride(0), normed.stride(0),
        HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(width),
    )
    return summed.view(x.shape), normed.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up, where gate_up [..., 2·inner] holds gate then up."""
    inner = gate_up.shape[-1] // 2
    if not use_kernel(gate_up):
        gate, up = gate_up.split(inner, dim=-1)
        return F.silu(gate) * up
    rows = gate_up.reshape(-1, 2 * inner)
    out = rows.new_empty((rows.shape[0], inner))
    block = 1024
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](
        rows, out, inner, rows.stride(0), out.stride(0), BLOCK=block,
    )
    return out.view(*gate_up.shape[:-1], inner)


def rotary_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slots: torch.Tensor, position: torch.Tensor, heads: int,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [rows, (heads + 2·kv_heads)·dim] of a decoding step's rows (or a prefill's tokens, one row each)
    -> rotary q [rows, heads, dim].

    The rotary k and the v of row b are written to slot slots[b] at position[b] of the caches
    [slots, kv_heads, capacity, dim]; cos and sin are [rows, dim]. With `k_scale`, `v_scale` [kv_heads] the
    caches are fp8 and get kv_quant.quantise's values. Kernel only (see use_kernel).
    """
    rows = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
    q = qkv.new_empty((rows, heads, dim))
    _rotary_to_cache_kernel[(rows, heads + 2 * kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, k_scale, v_scale, slots, position,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, QUANTISED=k_scale is not None,
        FP8_MAX=FP8_MAX,
    )
    return q


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(X, Delta, Weight, Summed, Normed, width, eps, sx, sd, ss, sn,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.load(X + row * sx + cols, mask=inside, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded to the activations' dtype as x + delta is
            x = (x + tl.load(Delta + row * sd + cols, mask=inside, other=0.0).to(tl.float32)).to(dtype)
            tl.store(Summed + row * ss + cols, x, mask=inside)
            x = x.to(tl.float32)
        variance = tl.sum(x * x, axis=0) / width
        scaled = (x * (1.0 / tl.sqrt_rn(variance + eps))).to(dtype).to(tl.float32)
        weight = tl.load(Weight + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Normed + row * sn + cols, (weight * scaled).to(dtype), mask=inside)

    @triton.jit
    def _silu_mul_kernel(GateUp, Out, inner, sg, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < inner
        gate = tl.load(GateUp + row * sg + cols, mask=inside, other=0.0)
        dtype = gate.dtype
        gate = gate.to(tl.float32)
        up = tl.load(GateUp + row * sg + inner + cols, mask=inside, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(Out + row * so + cols, (activated * up).to(dtype), mask=inside)

    @triton.jit
    def _rotary_to_cache_kernel(QKV, Cos, Sin, Q, KCache, VCache, KScale, VScale, Slots, Position,
                                s_qkv, s_cos, s_sin, sq_row, sq_head, sk_slot, sk_head, sk_pos,
                                sv_slot, sv_head, sv_pos, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                                HALF: tl.constexpr, QUANTISED: tl.constexpr, FP8_MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        d = tl.arange(0, HALF)
        base = QKV + row * s_qkv + head * (2 * HALF)
        first = tl.load(base + d)
        second = tl.load(base + HALF + d)
        dtype = first.dtype
        slot = tl.load(Slots + row).to(tl.int64)
        position = tl.load(Position + row).to(tl.int64)
        if head < HEADS + KV_HEADS:
            # q·cos + rotate_half(q)·sin, each product and the sum rounded as PyTorch rounds them
            cos_1 = tl.load(Cos + row * s_cos + d).to(tl.float32)
            cos_2 = tl.load(Cos + row * s_cos + HALF + d).to(tl.float32)
            sin_1 = tl.load(Sin + row * s_sin + d).to(tl.float32)
            sin_2 = tl.load(Sin + row * s_sin + HALF + d).to(tl.float32)
            x1, x2 = first.to(tl.float32), second.to(tl.float32)
            out_1 = ((x1 * cos_1).to(dtype).to(tl.float32) + (-x2 * sin_1).to(dtype).to(tl.float32)).to(dtype)
            out_2 = ((x2 * cos_2).to(dtype).to(tl.float32) + (x1 * sin_2).to(dtype).to(tl.float32)).to(dtype)
            # each branch stores its own: Triton types a variable once, and the cache may hold fp8, not bf16
            if head < HEADS:
                q_target = Q + row * sq_row + head * sq_head
                tl.store(q_target + d, out_1)
                tl.store(q_target + HALF + d, out_2)
            else:
                k_target = KCache + slot * sk_slot + (head - HEADS) * sk_head + position * sk_pos
                if QUANTISED:
                    k_scale = tl.load(KScale + head - HEADS)
                    tl.store(k_target + d, _saturate(out_1, k_scale, FP8_MAX).to(KCache.dtype.element_ty))
                    tl.store(k_target + HALF + d, _saturate(out_2, k_scale, FP8_MAX).to(KCache.dtype.element_ty))
                else:
                    tl.store(k_target + d, out_1)
                    tl.store(k_target + HALF + d, out_2)
        else:
            v_target = VCache + slot * sv_slot + (head - HEADS - KV_HEADS) * sv_head + position * sv_pos
            if QUANTISED:
                v_scale = tl.load(VScale + head - HEADS - KV_HEADS)
                tl.store(v_target + d, _saturate(first, v_scale, FP8_MAX).to(VCache.dtype.element_ty))
                tl.store(v_target + HALF + d, _saturate(second, v_scale, FP8_MAX).to(VCache.dtype.element_ty))
            else:
                tl.store(v_target + d, first)
                tl.store(v_target + HALF + d, second)

    @triton.jit
    def _saturate(x, scale, FP8_MAX: tl.constexpr):
        """x / scale within e4m3's range and already on its grid (round to nearest even, as kv_quant.quantise's
        cast rounds), so that the cast after it is exact: Triton's interpreter rounds ties away and loses the
        carry into the exponent when it casts to fp8 itself."""
        y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)
        bits = y.to(tl.int32, bitcast=True)
        power = (bits & 0x7F800000).to(tl.float32, bitcast=True)  # 2^floor(log2 |y|)
        step = tl.maximum(power * 0.125, 0.001953125)  # 3 mantissa bits; subnormals below 2^-6 step by 2^-9
        shift = step * 12582912.0  # 1.5 · 2^23 steps: a float32 add there rounds to a multiple of step
        rounded = (tl.abs(y) + shift) - shift
        return tl.where(bits < 0, -rounded, rounded)  # the sign bit's: -0 stays -0
