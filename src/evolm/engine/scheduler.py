"""Continuous refill: a whole population × prompts grid decoded as one stream through a fixed set of slots.

Every member group owns `per_group` slots of the backend's KV cache. When rows finish (EOS, stop string,
length) their slots go to the group's next waiting prompts, so a grid larger than memory never waits for
the longest row of a wave, and uneven lengths cost the steps they need. The host looks at the rows only
every `sync_every` steps, through a snapshot taken while the next steps already run, and rebuilds the batch (finished rows out, new rows prefilled in, the batch
shrunk to a smaller graph bucket once nothing waits) only when enough rows finished to be worth it.

Waiting rows are admitted longest-expected first (`order`, e.g. the lengths the same prompts reached last
time), so the rows that start late are short ones and the stream does not end on a tail of long rows.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from evolm.engine.decoding import STOP_CHECK_INTERVAL, STOP_WINDOW, stopped, trim_at_eos
from evolm.engine.sampling import SamplingParams

REBUILD_SHARE = 1 / 32  # rebuild the batch once this share of its rows finished (or nothing is left waiting)
BUCKET_STEP = 8  # batch buckets above this many rows a group are its multiples (one CUDA graph each)


@dataclass
class StreamResult:
    tokens: list[list[list[int]]]  # [group][prompt]
    steps: int  # decoding steps
    refills: int  # admissions of waiting rows after the first
    seconds: dict[str, float] = field(default_factory=dict)  # device time of "prefill" and "decode"
    host_seconds: dict[str, float] = field(default_factory=dict)  # host time of the loop's blocks (overlapping)


class PhaseClock:
    """Device seconds spent in each phase, from CUDA events (no host sync until `seconds`); host time on a CPU."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.spans: dict[str, list] = {}
        self.host_seconds: dict[str, float] = {}

    @contextmanager
    def host(self, name: str) -> Iterator[None]:
        """Host seconds of a block, no device sync: where the host's share of a call goes."""
        start = time.perf_counter()
        yield
        self.host_seconds[name] = self.host_seconds.get(name, 0.0) + time.perf_counter() - start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.setdefault(name, []).append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.spans.setdefault(name, []).append(time.perf_counter() - start)

    def seconds(self) -> dict[str, float]:
        """Device seconds by phase."""
        if self.on_gpu:
            torch.cuda.synchronize()
            return {n: sum(a.elapsed_time(b) for a, b in spans) / 1000 for n, spans in self.spans.items()}
        return {n: sum(spans) for n, spans in self.spans.items()}


def bucket(rows: int, per_group: int) -> int:
    """Rows a group runs in the batch: a power of two up to BUCKET_STEP, then the next multiple of it.

    Fine steps keep padding rows (which cost a full row's work) under BUCKET_STEP a group as the batch drains.
    """
    size = 1
    while size < min(rows, BUCKET_STEP):
        size *= 2
    if rows > BUCKET_STEP:
        size = -(-rows // BUCKET_STEP) * BUCKET_STEP
    return min(size, per_group)


def group_bucket(active: int, groups: int) -> int:
    """Member groups a batch runs: the next power of two of those with live rows, at most all of them."""
    size = 1
    while size < active:
        size *= 2
    return min(size, groups)


def stream(backend, groups: int, per_group: int, prompts: Sequence[Sequence[int]], params: SamplingParams,
           eos_token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, sync_every: int,
           on_rows: Callable[[int], object] | None = None, order: Sequence[int] | None = None,
           clock: PhaseClock | None = None) -> StreamResult:
    """Every (group, prompt) row through the backend's slots; tokens up to and including EOS.

    `order` is the order in which each group admits its prompts (default: as given).
    """
    order = list(range(len(prompts))) if order is None else list(order)
    if sorted(order) != list(range(len(prompts))):
        raise ValueError("order must be a permutation of the prompt indices")
    clock = clock or PhaseClock(torch.device("cpu"))
    waiting = [deque(order) for _ in range(groups)]
    free = [list(range(g * per_group, (g + 1) * per_group))[::-1] for g in range(groups)]
    live: list[dict[int, int]] = [{} for _ in range(groups)]  # slot -> prompt, per group
    stopped_slots: set[int] = set()
    tokens: list[list[list[int]]] = [[[] for _ in prompts] for _ in range(groups)]
    copies = []  # (group, prompt) of finished rows with their tokens on the way to the host
    refills = -1

    def refill() -> None:
        nonlocal refills
        slots, chosen = [], []
        for g in range(groups):
            while free[g] and waiting[g]:
                slot, prompt = free[g].pop(), waiting[g].popleft()
                live[g][slot] = prompt
                slots.append(slot)
                chosen.append(prompt)
        if slots:
            with clock.phase("prefill"):
                backend.admit(slots, [prompts[p] for p in chosen], chosen)
            refills += 1

    def rebuild() -> tuple[int, int]:
        """The batch from the live rows: only groups that have some (one lone long member costs its own rows)."""
        active = [g for g in range(groups) if live[g]]
        count = group_bucket(len(active), groups)
        chosen = active + [active[-1]] * (count - len(active))  # padding groups: scratch rows only
        rows = bucket(max(len(live[g]) for g in active), per_group)
        backend.set_batch([sorted(live[g]) if i < len(active) else [] for i, g in enumerate(chosen)], rows, chosen)
        return count, rows

    refill()
    count, rows = rebuild()
    with clock.phase("decode"):
        backend.decode(sync_every)
    steps = sync_every
    while any(live):
        # what the queued steps will have left, copied behind them; the next steps are queued before the host
        # waits for it, so the device decodes on while the host detokenises tails and picks finished rows
        check_stops = bool(params.stop_strings) and steps % STOP_CHECK_INTERVAL == 0
        snapshot = backend.snapshot(STOP_WINDOW if check_stops else 0)
        with clock.phase("decode"):
            backend.decode(sync_every)
        steps += sync_every
        with clock.host("waits"):  # the device runs the queued steps meanwhile
            done, tails = snapshot.wait()
        if check_stops:
            running = [s for s, d in done.items() if not d and s not in stopped_slots]
            if running:
                with clock.host("stop_checks"):
                    hits = stopped(tokenizer, [tails[s] for s in running], params.stop_strings)
                stopped_slots.update(s for s, hit in zip(running, hits) if hit)
        finished = [s for s, d in done.items() if d or s in stopped_slots]
        if not finished:
            continue
        finishing = Counter(backend.group_of(s) for s in finished)
        still = [len(g) - finishing[i] for i, g in enumerate(live)]
        shrinks = not any(waiting) and (bucket(max(still), per_group) < rows
                                        or group_bucket(sum(n > 0 for n in still), groups) < count)
        if len(finished) < max(1, count * rows * REBUILD_SHARE) and len(finished) < len(done) and not shrinks:
            continue
        with clock.host("rebuilds"):  # prefill launches, and a graph capture for a new bucket
            copies.append(([], backend.generated(finished)))  # read at the end: no wait for the queue here
            for slot in finished:
                group = backend.group_of(slot)
                copies[-1][0].append((group, live[group].pop(slot)))
                free[group].append(slot)
                stopped_slots.discard(slot)
            if on_rows is not None:
                on_rows(len(finished))
            refill()
            if any(live):
                count, rows = rebuild()
    for rows, copy in copies:
        for (group, prompt), row in zip(rows, copy.wait()):
            tokens[group][prompt] = trim_at_eos(row, eos_token_ids)
    return StreamResult(tokens, steps, max(refills, 0), clock.seconds(), clock.host_seconds)
