"""Decode attention over a slot KV cache: each row reads its own slot up to its own length, nothing more.

The cache of a layer is [slots, kv_heads, capacity, head_dim]; row b of a decoding step is the slot
`slots[b]` with `lengths[b]` valid keys. On a GPU a Triton kernel (flash decoding: the keys of a row are
split across programs when there are few rows, partial results merged by their log-sum-exp) reads
lengths from device memory, so one launch serves any mix of lengths and a CUDA graph can replay it;
padding costs nothing. Elsewhere (and as the kernel's reference) plain PyTorch with a mask.

An fp8 cache (engine/kv_quant.py) comes with its per-KV-head scales `k_scale`, `v_scale`: the kernel loads
fp8, widens it to the queries' dtype and folds the scales into its scores and its output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evolm.engine.kv_quant import dequantise
from evolm.kernels import tl, triton, use_kernel

BLOCK_KEYS = 64  # keys per inner iteration of the kernel
KERNEL_WARPS, KERNEL_STAGES = 4, 3  # Triton's defaults; bench/decode_step_gpu.py times the alternatives
TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU several times over; fewer rows split their keys


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [rows, heads, dim] against keys [0, lengths[b]) of slot slots[b] -> [rows, heads, dim]; `k_scale`,
    `v_scale` [kv_heads] for an fp8 cache (None: the cache holds the keys and values themselves)."""
    if use_kernel(q):
        return _kernel_attention(q, k_cache, v_cache, slots, lengths, scale, k_scale, v_scale)
    return reference_attention(q, k_cache, v_cache, slots, lengths, scale, k_scale, v_scale)


def reference_attention(q, k_cache, v_cache, slots, lengths, scale, k_scale=None, v_scale=None):
    rows, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    keys, values = k_cache[slots], v_cache[slots]  # [rows, kv_heads, capacity, dim]
    if k_scale is not None:
        keys, values = dequantise(keys, k_scale, q.dtype), dequantise(values, v_scale, q.dtype)
    valid = torch.arange(capacity, device=q.device)[None, :] < lengths[:, None]
    grouped = q.view(rows, kv_heads, heads // kv_heads, dim)  # heads sharing a KV head as queries
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(rows, heads, dim)


def splits_for(rows: int, kv_heads: int, capacity: int) -> int:
    """How many programs share one row's keys: only as many as it takes to keep the GPU busy."""
    split = max(1, TARGET_PROGRAMS // max(rows * kv_heads, 1))
    return min(split, max(1, math.ceil(capacity / BLOCK_KEYS)))


def _kernel_attention(q, k_cache, v_cache, slots, lengths, scale, k_scale=None, v_scale=None, block=None,
                      warps=None, stages=None):
    """The Triton kernel; `block` (keys per iteration), `warps` and `stages` override the defaults (bench)."""
    rows, heads, dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    block = block or BLOCK_KEYS
    splits = splits_for(rows, kv_heads, capacity)
    split_len = math.ceil(math.ceil(capacity / splits) / block) * block
    out = torch.empty((rows, heads, splits, dim), device=q.device, dtype=torch.float32)
    lse = torch.empty((rows, heads, splits), device=q.device, dtype=torch.float32)
    _decode_kernel[(rows, kv_heads, splits)](
        q, k_cache, v_cache, k_scale, v_scale, slots, lengths, out, lse, scale, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, BLOCK=block,
        QUANTISED=k_scale is not None,
        num_warps=warps or KERNEL_WARPS, num_stages=stages or KERNEL_STAGES,
    )
    if splits == 1:
        return out[:, :, 0].to(q.dtype)
    weights = torch.softmax(lse, dim=-1)  # an empty split has lse = -inf and weight 0; split 0 is never empty
    return (out * weights[..., None]).sum(2).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, KScale, VScale, Slots, Lengths, Out, Lse, scale, split_len,
                       sq_row, sq_head, sk_slot, sk_head, sk_pos, sv_slot, sv_head, sv_pos,
                       so_row, so_head, so_split, sl_row, sl_head,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                       QUANTISED: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(Slots + row).to(tl.int64)
        length = tl.load(Lengths + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        heads = kv_head * GROUP + g
        in_group = g < GROUP
        q = tl.load(Q + row * sq_row + heads[:, None] * sq_head + d[None, :], mask=in_group[:, None], other=0.0)
        if QUANTISED:  # the key scale folds into the scores' scale, the value scale into the output
            scale = scale * tl.load(KScale + kv_head)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        total = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], dtype=tl.float32)
        k_base = K + slot * sk_slot + kv_head * sk_head
        v_base = V + slot * sv_slot + kv_head * sv_head
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            valid = n < end
            k = tl.load(k_base + n[:, None] * sk_pos + d[None, :], mask=valid[:, None], other=0.0)
            if QUANTISED:
                k = k.to(q.dtype)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * sv_pos + d[None, :], mask=valid[:, None], other=0.0)
            if QUANTISED:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        seen = total > 0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        if QUANTISED:
            out = out * tl.load(VScale + kv_head)
        lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(Out + row * so_row + heads[:, None] * so_head + split * so_split + d[None, :], out,
                 mask=in_group[:, None])
        tl.store(Lse + row * sl_row + heads * sl_head + split, lse, mask=in_group)
