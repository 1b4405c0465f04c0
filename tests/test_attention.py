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


def test_kernel_matches_reference_for_every_length():
    run_interpreted(CHECK)


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
