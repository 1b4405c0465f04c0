"""The decoding loop shared by the engine's backends: pick tokens, stop rows, drop finished rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from evolm.engine.sampling import SamplingParams, pick_token

STOP_CHECK_INTERVAL = 8  # decoding steps between stop-string checks (they need detokenising)
STOP_WINDOW = STOP_CHECK_INTERVAL + 24  # trailing tokens detokenised per check: a stop string is shorter


class Backend(Protocol):
    """Runs the model for a wave of rows whose KV cache it owns; the routing object says each row's member."""

    def prefill(self, prompts: list[Sequence[int]], row_members: torch.Tensor | None,
                max_new_tokens: int) -> torch.Tensor:
        """Logits [rows, vocab] after the prompts; room is made for `max_new_tokens` more per row."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] after one more token per live row."""

    def keep(self, index: torch.Tensor) -> None:
        """Keep only these live rows (in this order) from now on."""

    def close(self) -> None: ...


def left_pad(prompts: list[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, left padded as generate() does for decoder-only models."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def decode(
    backend: Backend,
    prompts: list[Sequence[int]],
    row_members: torch.Tensor | None,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    stop_check: StopCheck,
    keys: torch.Tensor,
    sync_every: int = 1,
) -> tuple[list[list[int]], int]:
    """Generated tokens per row (up to and including EOS), and how many decoding steps ran; `keys` [rows, 2]
    are the rows' sampling keys (`sampling.row_keys`), `stop_check` is for `params.stop_strings`.

    The host looks at which rows finished only every `sync_every` steps, so that on a GPU the
    host can queue work ahead; rows that finished in between run on idly until then.
    """
    logits = backend.prefill(prompts, row_members, params.max_new_tokens)
    device = logits.device
    n = len(prompts)
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    out = torch.full((n, params.max_new_tokens), -1, dtype=torch.long, device=device)
    live = torch.arange(n, device=device)  # original row of each live row
    keys = keys.to(device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    steps = 0
    try:
        for step in range(params.max_new_tokens):
            steps = step + 1
            token = pick_token(logits, params, keys[live], torch.full_like(live, step))
            out[live, step] = token
            finished |= torch.isin(token, eos)
            last = step + 1 == params.max_new_tokens
            if last:
                break
            if (step + 1) % sync_every == 0:
                if params.stop_strings and (step + 1) % STOP_CHECK_INTERVAL == 0:
                    tails = out[live, max(0, step + 1 - STOP_WINDOW) : step + 1].tolist()
                    finished |= torch.tensor(stop_check(tails, STOP_CHECK_INTERVAL), device=device)
                if finished.any():
                    keep = (~finished).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    live, token, finished = live[keep], token[keep], finished[keep]
                    backend.keep(keep)
            logits = backend.step(token)
    finally:
        backend.close()
    return [trim_at_eos(row, eos_token_ids) for row in out.tolist()], steps


def decode_texts(tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]]) -> list[str]:
    """`tokenizer.decode(row, skip_special_tokens=True)` of every row, the same text, in one call.

    A Rust-backed tokenizer that cleans nothing up decodes the whole batch in Rust, on every core: the
    reasoning regime detokenises thousands of rows of hundreds of tokens several times a generation.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "decode_batch") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode_batch([list(row) for row in rows], skip_special_tokens=True)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


class StopCheck:
    """Whether rows' trailing tokens hold a stop string, detokenising only the rows that may newly hold one.

    The token that completes a stop string holds its last character, so a row none of whose tokens since the
    last look holds one cannot have completed a stop string since; most rows are skipped. Where that is not
    safe to tell token by token (a last character outside ASCII, whose bytes a byte-level token may split),
    every row is detokenised. Build one per tokenizer and stop strings: it decodes the vocabulary once.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]):
        self.tokenizer, self.stop_strings = tokenizer, tuple(s for s in stop_strings if s)
        lasts = {s[-1] for s in self.stop_strings}
        self.enders: frozenset[int] | None = None
        if lasts and all(c.isascii() for c in lasts):
            vocab = range(len(tokenizer))
            texts = decode_texts(tokenizer, [[i] for i in vocab])
            self.enders = frozenset(i for i, text in zip(vocab, texts) if any(c in text for c in lasts))

    def __call__(self, tails: Sequence[Sequence[int]], new: int) -> list[bool]:
        """Per row of trailing tokens (-1: none), of which the last `new` came since the last look."""
        rows = [[t for t in row if t >= 0] for row in tails]
        hits = [False] * len(rows)
        if not self.stop_strings:
            return hits
        maybe = [i for i, row in enumerate(rows) if self.enders is None or not self.enders.isdisjoint(row[-new:])]
        texts = decode_texts(self.tokenizer, [rows[i] for i in maybe])
        for i, text in zip(maybe, texts):
            hits[i] = cut_at_stop(text, self.stop_strings)[1]
        return hits


def trim_at_stops(tokenizer: PreTrainedTokenizerBase, rows: list[list[int]],
                  stop_strings: Sequence[str]) -> list[list[int]]:
    """Each row's shortest prefix whose text holds a stop string (the whole row when none does).

    Rows run on for a few steps after their stop string until the host looks; cutting the tokens here
    makes them independent of when it looked (of the wave, the refill order, the check interval).
    The cut is guessed from where the earliest stop string ends in the row's text and the lengths of its
    tokens' own texts, and checked by two probes (that prefix holds a stop string, one token less does
    not). A guess that misses (characters split across tokens, cleaned-up spaces) is off by a few tokens:
    the search gallops away from it in doubling steps until the cut is bracketed, then bisects. Each
    round's probes of all rows are decoded in one batch: two rounds where the guess is right.
    """
    if not stop_strings:
        return rows
    texts = decode_texts(tokenizer, rows)
    ends = {i: len(cut) for i, (cut, found) in enumerate(cut_at_stop(t, stop_strings) for t in texts) if found}
    # the prefix of length high[i] holds a stop string and that of length low[i] - 1 does not
    low = {i: 1 for i in ends}
    high = {i: len(rows[i]) for i in ends}
    vocab = sorted({t for i in ends for t in rows[i]})
    piece = dict(zip(vocab, map(len, decode_texts(tokenizer, [[t] for t in vocab]))))
    guess = {i: _tokens_to_reach(rows[i], ends[i], piece) for i in ends}
    # per row still searching near its guess: 0 probes the guess, then the signed step away from it, doubled
    # each round until a probe lands past the cut; rows without one bisect
    step = dict.fromkeys(ends, 0)
    while open_rows := [i for i in low if low[i] < high[i]]:
        probe = {i: _next_probe(guess[i], low[i], high[i], step.get(i)) for i in open_rows}
        for i, text in zip(open_rows, decode_texts(tokenizer, [rows[i][: probe[i]] for i in open_rows])):
            holds = cut_at_stop(text, stop_strings)[1]
            if holds:
                high[i] = probe[i]
            else:
                low[i] = probe[i] + 1
            if i not in step:
                continue
            if step[i] == 0:
                step[i] = -1 if holds else 1
            elif holds == (step[i] > 0):  # bracketed: bisect from here
                del step[i]
            else:
                step[i] *= 2
    return [row[: high[i]] if i in high else row for i, row in enumerate(rows)]


def _next_probe(guess: int, low: int, high: int, step: int | None) -> int:
    """A prefix length in [low, high) to decode next: the guess (step 0), `step` tokens past the bound the last
    probe moved (galloping away from the guess), or the middle (step None)."""
    if step is None:
        return (low + high) // 2
    if step == 0:
        return min(max(guess, low), high - 1)
    return min(high - 1, low - 1 + step) if step > 0 else max(low, high + step)


def _tokens_to_reach(row: list[int], characters: int, piece: dict[int, int]) -> int:
    """The fewest leading tokens of `row` whose own texts add up to `characters` (at least 1)."""
    total = 0
    for n, token in enumerate(row, start=1):
        total += piece[token]
        if total >= characters:
            return n
    return len(row)


def trim_at_eos(row: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Generated tokens up to and including the first EOS (as generate() returns them)."""
    out = []
    for token in row:
        if token < 0:
            break
        out.append(token)
        if token in eos_ids:
            break
    return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Text up to and including the earliest stop string, and whether one was found."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return (text[: min(ends)], True) if ends else (text, False)
