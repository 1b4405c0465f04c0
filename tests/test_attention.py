"""The decode-attention kernel against plain PyTorch, run by Triton's interpreter on the CPU."""

from __future__ import annotations

import torch
from helpers.interpreter import run_interpreted

from evolm.engine.attention import reference_attention, splits_for

CHECK = r"""
import torch
from evolm.engine import attention
assert attention.use_kernel(torch.zeros(1))
torch.manual_seed(0)
# (6, 2): three query heads share a KV head, their keys split across programs and merged; (4, 4): no sharing
for heads, kv_heads, dim, capacity, lengths, splits in [(6, 2, 32, 150, [1, 64, 65, 150, 7], 3),
                                                        (4, 4, 16, 40, [40, 3], 1)]:
    slots = 8
    k = torch.randn(slots, kv_heads, capacity, dim)
    v = torch.randn(slots, kv_heads, capacity, dim)
    rows = torch.tensor([5, 0, 7, 2, 3][: len(lengths)])
    q = torch.randn(len(lengths), heads, dim)
    n = torch.tensor(lengths)
    ours = attention._kernel_attention(q, k, v, rows, n, 0.3)
    ref = attention.reference_attention(q, k, v, rows, n, 0.3)
    assert attention.splits_for(len(lengths), kv_heads, capacity) == splits
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
print("ok")
"""


FP8 = r"""
import torch
from evolm.engine import attention, kv_quant
torch.manual_seed(0)
heads, kv_heads, dim, capacity, slots = 6, 2, 32, 150, 8
k = torch.randn(slots, kv_heads, capacity, dim)
k[:, :, :, 3] += 60.0  # a large channel, as k_proj's bias gives Qwen2.5's keys
v = torch.randn(slots, kv_heads, capacity, dim) * torch.tensor([1.0, 5.0])[None, :, None, None]
k_scale, v_scale = kv_quant.head_scales(k), kv_quant.head_scales(v)
k8, v8 = kv_quant.quantise(k, k_scale), kv_quant.quantise(v, v_scale)
assert k8.dtype == torch.float8_e4m3fn and torch.isfinite(kv_quant.dequantise(k8, k_scale, torch.float32)).all()
rows, n = torch.tensor([5, 0, 7, 2]), torch.tensor([1, 64, 150, 33])
for count in (4, 1):  # one row: its keys split across programs
    q = torch.randn(count, heads, dim) * 0.2
    ours = attention._kernel_attention(q, k8, v8, rows[:count], n[:count], 0.3, k_scale, v_scale)
    same_cache = attention.reference_attention(q, k8, v8, rows[:count], n[:count], 0.3, k_scale, v_scale)
    assert torch.allclose(ours, same_cache, atol=1e-5), (ours - same_cache).abs().max()
    exact = attention.reference_attention(q, k, v, rows[:count], n[:count], 0.3)
    error = (ours - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.05, error  # e4m3 keeps 3 mantissa bits: a few percent at most, never exact
huge = kv_quant.quantise(k * 100, k_scale)  # past the headroom: saturates at ±448, never NaN
assert huge.float().abs().max() == kv_quant.FP8_MAX and not huge.float().isnan().any()
print("ok")
"""


def test_kernel_matches_reference_for_every_length():
    run_interpreted(CHECK)


def test_kernel_over_an_fp8_cache_matches_the_reference_over_the_same_cache():
    """The kernel dequantises as the reference does (tight), and an fp8 cache stays within a few percent of the
    exact attention (loose): the keys carry one large channel, which a per-head scale must fit."""
    run_interpreted(FP8)


def test_reference_reads_only_each_rows_own_keys():
    """Keys past a row's length, and other slots' keys, do not change its output."""
    torch.manual_seed(1)
    k, v = torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    q = torch.randn(2, 4, 8)
    slots, lengths = torch.tensor([3, 1]), torch.tensor([4, 10])
    before = reference_attention(q, k, v, slots, lengths, 0.5)
    k[3, :, 4:], v[3, :, 4:] = 100.0, -100.0  # beyond row 0's length
    k[0], v[0] = 50.0, 50.0  # a slot no row reads
    assert torch.equal(reference_attention(q, k, v, slots, lengths, 0.5), before)
    alone = reference_attention(q[:1], k[3:4, :, :4], v[3:4, :, :4], torch.tensor([0]), torch.tensor([4]), 0.5)
    assert torch.allclose(before[:1], alone, atol=1e-6)


def test_few_rows_split_their_keys_many_rows_do_not():
    assert splits_for(rows=4, kv_heads=2, capacity=1200) > 1
    assert splits_for(rows=2048, kv_heads=2, capacity=1200) == 1
    assert splits_for(rows=1, kv_heads=1, capacity=10) == 1  # never more splits than key blocks
