"""The low-rank add kernel (engine/lowrank.py) against baddbmm_, run by Triton's interpreter on the CPU."""

from __future__ import annotations

from helpers.interpreter import run_interpreted

CHECK = r"""
import torch
from evolm.engine import lowrank
assert lowrank.use_kernel(torch.zeros(1))
lowrank.KERNEL = True  # off by default until measured on a GPU
torch.manual_seed(0)
# ragged tiles on both axes, ranks below, at and above the padded 16, a strided batch (rows of a larger view)
for groups, rows, columns, rank in [(3, 5, 200, 8), (2, 70, 130, 16), (1, 1, 7, 24), (4, 64, 128, 3)]:
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(groups, rows + 2, columns).to(dtype)[:, 1 : rows + 1]  # not contiguous across groups
        t = torch.randn(groups, rows, rank).to(dtype)
        b = torch.randn(groups, rank, columns).to(dtype)
        expected = y.clone().baddbmm_(t, b)
        before = y.clone()
        ours = lowrank.add_lowrank_(y, t, b)
        assert ours is y
        if dtype == torch.float32:
            assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5), (y - expected).abs().max()
        else:  # the interpreter stores bf16 by truncating, a GPU rounds to nearest: a last bit apart
            assert torch.allclose(y.float(), expected.float(), rtol=2 ** -6, atol=2 ** -6), (y - expected).abs().max()
        assert not torch.equal(y, before)
print("ok")
"""


def test_the_lowrank_add_kernel_matches_baddbmm():
    run_interpreted(CHECK)
