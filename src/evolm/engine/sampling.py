"""Picking the next token without a generator's state: a sampled token is a pure function of (seed, prompt,
position) and the logits.

Sampling is the Gumbel-max trick: the token is the argmax over the vocabulary of logits / T + G with
G = −log(−log U), U the counter-based uniform (`evolm.counter_hash`) of the row's key, its position and the
token id. That is an exact draw from softmax(logits / T), restricted to the top-p nucleus when top_p < 1.
Since no generator advances:
- a row's text does not depend on the batch it ran in, its slot, the refill order or the graph bucket (the
  tests compare the refilled stream with the wave-by-wave path for sampled decoding as for greedy);
- a sampled decoding step holds no host-side state, so the fused backend captures it in a CUDA graph as it
  does a greedy one (eager sampled steps cost ~20 ms at 128 rows on an H200: most of a GRPO step);
- members meet the same noise on the same prompt (common random numbers), so ES members' fitnesses differ
  by their weights, not by their luck. A row's key comes from (seed, prompt index): prompts repeated
  within a call (GRPO's groups, k samples) draw independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evolm.counter_hash import stream_key, uniform_bits
from evolm.kernels import tl, triton, use_kernel

BLOCK = 1024  # vocabulary entries a kernel program scores at a time


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_strings: Sequence[str] = ()
    seed: int = 0  # with the prompt's index and position, fixes every sampled token: same seed, same text


def row_keys(seed: int, prompt_indices: Sequence[int]) -> torch.Tensor:
    """[rows, 2] int64 on the host: the stream key of each row, from the call's seed and the row's prompt (every
    member's row of a prompt has the same key, so each distinct prompt's is hashed once)."""
    keys = {i: stream_key(seed, i) for i in set(prompt_indices)}
    return torch.tensor([keys[i] for i in prompt_indices], dtype=torch.long).reshape(-1, 2)


def pick_token(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else a draw whose randomness is fixed by the
    row's key and position (the number of tokens it generated before)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    if params.top_p < 1.0:
        logits = nucleus(logits, params)
    if use_kernel(logits):
        return _gumbel_argmax_kernel(logits, params.temperature, keys, positions)
    return gumbel_argmax(logits, params.temperature, keys, positions)


def nucleus(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits with the tokens outside the top-p nucleus of softmax(logits / T) at −inf."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
    return logits.float().masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))


def gumbel_argmax(logits: torch.Tensor, temperature: float, keys: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """The draw as PyTorch ops (float64 scores): what the kernel computes without storing the noise."""
    return (logits.double() / temperature + gumbel(keys, positions, logits.shape[-1])).argmax(dim=-1)


def gumbel(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float64 standard Gumbel noise of each row's (key, position) and every token id."""
    counters = (positions.long()[:, None] << 32) | torch.arange(vocab, device=keys.device)[None, :]
    bits = uniform_bits(counters, (keys[:, :1], keys[:, 1:]))
    return -torch.log(-torch.log((bits.double() + 0.5) / 2.0**32))


def _gumbel_argmax_kernel(logits: torch.Tensor, temperature: float, keys: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """gumbel_argmax in one Triton program a row, the noise never stored."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    # a tensor, not a kernel argument: a Python float would reach the kernel rounded to float32
    scale = torch.full((1,), temperature, dtype=torch.float64, device=logits.device)
    _gumbel_argmax[(rows,)](logits, scale, keys.contiguous(), positions.contiguous(), out, vocab, BLOCK=BLOCK)
    return out


if triton is not None:
    from evolm.counter_hash import uniform_bits_kernel

    @triton.jit
    def _gumbel_argmax(Logits, Temperature, Keys, Positions, Out, vocab, BLOCK: tl.constexpr):
        """Each lane keeps the best score it saw (strictly better only: its first maximum); the row's token is
        the smallest index among the lanes that hold the maximum, torch.argmax's first maximum."""
        row = tl.program_id(0).to(tl.int64)
        k1, k2 = tl.load(Keys + 2 * row), tl.load(Keys + 2 * row + 1)
        high = tl.load(Positions + row).to(tl.int64) << 32
        temperature = tl.load(Temperature)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        best_score = tl.full([BLOCK], float("-inf"), tl.float64)
        best_index = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            inside = index < vocab
            logit = tl.load(Logits + row * vocab + index, mask=inside, other=float("-inf")).to(tl.float64)
            u = (uniform_bits_kernel(high | index, k1, k2).to(tl.float64) + 0.5) / 4294967296.0
            score = tl.where(inside, logit / temperature - tl.log(-tl.log(u)), float("-inf"))
            better = score > best_score
            best_score = tl.where(better, score, best_score)
            best_index = tl.where(better, index, best_index)
        top = tl.max(best_score, axis=0)
        tl.store(Out + row, tl.min(tl.where(best_score == top, best_index, vocab), axis=0))
