"""Continuous refill: a whole population × prompts grid decoded as one stream through a fixed set of slots.

Every member group owns `per_group` slots of the backend's KV cache. When rows finish (EOS, stop string,
length) their slots go to the group's next waiting prompts, so a grid larger than memory never waits for
the longest row of a wave, and uneven lengths cost the steps they need. The host looks at the rows only
every `sync_every` steps, through a snapshot taken while the next steps already run, and rebuilds the batch
(finished rows out, new rows prefilled in, the batch shrunk to a smaller graph bucket once nothing waits) only
when enough rows finished to be worth it. As rows drain unevenly, a member's rows are split over several
batch groups (`batch_layout`), so the batch is not as wide as its fullest member for every member.

The prompts' shared prefix (a template's instructions, a system prompt) is prefilled once per member group
and its keys copied into every admitted slot, so only the rest of each prompt is computed.

Waiting rows are admitted longest-expected first (`order`, e.g. the lengths the same prompts reached last
time), so the rows that start late are short ones and the stream does not end on a tail of long rows.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from math import prod

import torch

from evolm.engine.decoding import STOP_CHECK_INTERVAL, STOP_WINDOW, StopCheck, trim_at_eos
from evolm.engine.sampling import SamplingParams

MIN_SHARED_PREFIX = 8  # prompt tokens all of a call's prompts must share before their prefill is shared
REBUILD_SHARE = 1 / 32  # rebuild the batch once this share of its rows finished (or nothing is left waiting)
BUCKET_STEP = 8  # batch buckets above this many rows a group are its multiples (one CUDA graph each)


@dataclass
class StreamResult:
    tokens: list[list[list[int]]]  # [group][prompt]
    steps: int  # decoding steps
    row_steps: int  # rows decoded, summed over the steps: padding and rows finished since the last look included
    refills: int  # admissions of waiting rows after the first
    seconds: dict[str, float] = field(default_factory=dict)  # device time of "prefill" and "decode"
    host_seconds: dict[str, float] = field(default_factory=dict)  # host time of the call's blocks (overlapping)


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


@lru_cache
def chunk_sizes(per_group: int) -> tuple[int, ...]:
    """The rows a batch group may run (the values `bucket` takes), largest first."""
    return tuple(sorted({bucket(n, per_group) for n in range(1, per_group + 1)}, reverse=True))


def batch_layout(live: Sequence[int], groups: int, per_group: int) -> tuple[list[int], int, int]:
    """(pieces, count, rows) for member groups with `live` rows each: member g's rows split evenly into
    pieces[g] pieces, one batch group a piece (padded to `count` groups of `rows` rows; at most `groups` pieces,
    which the factor buffers hold), at the piece size that decodes the fewest rows, count × rows.

    A padding row costs a whole row's matmuls, so a batch as wide as its fullest member is wasteful once
    rows drain unevenly: one member's 150 long rows beside seven members' 2 (of 30 members) would run 8 × 152
    rows a step; in pieces of at most 8 they run 30 × 8.
    """
    best: tuple[int, list[int], int, int] | None = None
    for chunk in chunk_sizes(per_group):
        pieces = [-(-n // chunk) for n in live]
        if sum(pieces) > groups:
            break  # smaller chunks only make more pieces
        count = bucket(sum(pieces), groups)
        rows = bucket(max(-(-n // k) for n, k in zip(live, pieces) if k), per_group)
        if best is None or count * rows < best[0]:
            best = (count * rows, pieces, count, rows)
    assert best is not None, "the largest chunk always fits: one piece a member"
    return best[1:]


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The tokens every prompt starts with (a template's instructions, a system prompt), short of each prompt's
    last token, whose logits pick the row's first token; empty when too short or only one prompt to share it."""
    if len(prompts) < 2:
        return []
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        same = 0
        while same < length and prompt[same] == first[same]:
            same += 1
        length = same
    return list(first[:length]) if length >= MIN_SHARED_PREFIX else []


def stream(backend, groups: int, per_group: int, prompts: Sequence[Sequence[int]], params: SamplingParams,
           eos_token_ids: Sequence[int], stop_check: StopCheck, sync_every: int,
           on_rows: Callable[[int], object] | None = None, order: Sequence[int] | None = None,
           clock: PhaseClock | None = None) -> StreamResult:
    """Every (group, prompt) row through the backend's slots; tokens up to and including EOS.

    `order` is the order in which each group admits its prompts (default: as given); `stop_check` is for
    `params.stop_strings`.
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
        """The batch from the live rows (batch_layout): groups without any take no place, and a member's rows
        may fill several batch groups, each running that member's perturbation."""
        split, count, rows = batch_layout([len(g) for g in live], groups, per_group)
        members, pieces = [], []
        for g, k in enumerate(split):
            slots = sorted(live[g])
            members += [g] * k
            pieces += [slots[i::k] for i in range(k)]
        members += [members[-1]] * (count - len(members))  # padding groups: scratch rows only
        pieces += [[]] * (count - len(pieces))
        backend.set_batch(pieces, rows, members)
        return count, rows

    prefix = shared_prefix(prompts)
    with clock.phase("prefill"):
        backend.share_prefix(prefix)
    refill()
    with clock.host("rebuilds"):
        count, rows = rebuild()
    with clock.phase("decode"):
        backend.decode(sync_every)
    steps, row_steps = sync_every, count * rows * sync_every
    checked = 0  # the steps queued when the stop strings were last looked for
    while any(live):
        # what the queued steps will have left, copied behind them; the next steps are queued before the host
        # waits for it, so the device decodes on while the host detokenises tails and picks finished rows
        check_stops = bool(params.stop_strings) and steps % STOP_CHECK_INTERVAL == 0
        snapshot, at = backend.snapshot(STOP_WINDOW if check_stops else 0), steps
        with clock.phase("decode"):
            backend.decode(sync_every)
        steps += sync_every
        row_steps += count * rows * sync_every
        with clock.host("waits"):  # the device runs the queued steps meanwhile
            done, tails = snapshot.wait()
        if check_stops:
            running = [s for s, d in done.items() if not d and s not in stopped_slots]
            if running:
                with clock.host("stop_checks"):
                    hits = stop_check([tails[s] for s in running], at - checked)
                stopped_slots.update(s for s, hit in zip(running, hits) if hit)
            checked = at
        finished = [s for s, d in done.items() if d or s in stopped_slots]
        if not finished:
            continue
        finishing = Counter(backend.group_of(s) for s in finished)
        still = [len(g) - finishing[i] for i, g in enumerate(live)]
        shrinks = not any(waiting) and any(still) and prod(batch_layout(still, groups, per_group)[1:]) < count * rows
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
    with clock.host("collect"):  # the finished rows read back (the queue's last steps first), cut at EOS
        for rows, copy in copies:
            for (group, prompt), row in zip(rows, copy.wait()):
                tokens[group][prompt] = trim_at_eos(row, eos_token_ids)
    return StreamResult(tokens, steps, row_steps, max(refills, 0), clock.seconds(), clock.host_seconds)
