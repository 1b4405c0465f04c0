"""Sampling by counter-based Gumbel noise: the right distribution, and the kernel draws what the PyTorch ops draw."""

from __future__ import annotations

import math

import torch
from helpers.interpreter import run_interpreted

from evolm.engine.sampling import SamplingParams, pick_token, row_keys

PROBS = [0.1, 0.2, 0.3, 0.4]


def _frequencies(params: SamplingParams, rows: int = 20000, position: int = 0) -> torch.Tensor:
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(rows, 1) * params.temperature
    tokens = pick_token(logits, params, row_keys(params.seed, range(rows)), torch.full((rows,), position))
    return torch.bincount(tokens, minlength=len(PROBS)) / rows


def test_draws_follow_the_softmax_and_the_nucleus():
    sampled = _frequencies(SamplingParams(temperature=0.7, seed=1))
    assert torch.allclose(sampled, torch.tensor(PROBS), atol=0.015), sampled
    nucleus = _frequencies(SamplingParams(temperature=1.0, top_p=0.5, seed=1))  # the nucleus is {0.4, 0.3}
    assert nucleus[:2].sum() == 0 and torch.allclose(nucleus[2:], torch.tensor([3 / 7, 4 / 7]), atol=0.015), nucleus


def test_draws_are_fixed_by_seed_row_and_position():
    params = SamplingParams(temperature=1.0, seed=3)
    logits = torch.randn(64, 50)
    keys, positions = row_keys(3, range(64)), torch.arange(64)
    tokens = pick_token(logits, params, keys, positions)
    assert torch.equal(tokens, pick_token(logits, params, keys, positions))
    assert torch.equal(tokens[10:20], pick_token(logits[10:20], params, keys[10:20], positions[10:20]))
    assert not torch.equal(tokens, pick_token(logits, params, keys, positions + 1))
    assert not torch.equal(tokens, pick_token(logits, params, row_keys(4, range(64)), positions))
    assert torch.equal(pick_token(logits, SamplingParams(), keys, positions), logits.argmax(-1))


SAMPLING_KERNEL = r"""
import os
import torch
from evolm.engine.sampling import SamplingParams, pick_token, row_keys
g = torch.Generator().manual_seed(0)
for rows, vocab, temperature, top_p, position in [(7, 3000, 0.7, 1.0, 5), (5, 1024, 1.3, 0.9, 2**31 - 3)]:
    logits = torch.randn(rows, vocab, generator=g).to(torch.bfloat16) * 4
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=2**40 + 3)
    keys, positions = row_keys(params.seed, range(100, 100 + rows)), torch.full((rows,), position)
    kernel = pick_token(logits, params, keys, positions)  # the interpreter runs the Triton kernel
    os.environ["TRITON_INTERPRET"] = "0"  # read at each call: the PyTorch ops
    assert torch.equal(kernel, pick_token(logits, params, keys, positions)), (kernel, pick_token(logits, params, keys, positions))
    os.environ["TRITON_INTERPRET"] = "1"
print("ok")
"""


def test_the_sampling_kernel_picks_what_the_pytorch_ops_pick():
    """A vocabulary that is not a multiple of the block, bf16 logits, the nucleus, positions near 2**31."""
    run_interpreted(SAMPLING_KERNEL)
