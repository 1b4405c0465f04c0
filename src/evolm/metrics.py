"""What a run's numbers mean, wherever they are read (runs, reports, comparisons, `runs list`): the metric
a set is judged by, and a generation's fitness statistics. Plain numbers only, no model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from evolm.tasks.base import Score

FITNESS_STATISTICS = ("mean", "std", "min", "max", "p20", "p80")


def headline_metric_name(rows: Iterable[dict]) -> str:
    """The metric a set's evaluations are judged by: accuracy where the task gives verdicts (every row has
    one), else mean reward."""
    return "accuracy" if all(row.get("accuracy") is not None for row in rows) else "reward"


def headline_metric(metrics: dict) -> tuple[str, float | None]:
    """(name, value) of one evaluation's headline metric (see headline_metric_name)."""
    name = headline_metric_name([metrics])
    return name, metrics.get(name)


def fitness_statistics(fitness: Sequence[float] | np.ndarray) -> dict[str, float]:
    """A generation's fitnesses summarised as the history rows of ES and search record them."""
    f = np.asarray(fitness)
    return {"mean": float(f.mean()), "std": float(f.std()), "min": float(f.min()), "max": float(f.max()),
            "p20": float(np.percentile(f, 20)), "p80": float(np.percentile(f, 80))}


def best_of(scores: list[Score], n_examples: int) -> list[Score]:
    """Per example, the best of its samples (rows i, i + n, i + 2n, …): the highest reward, and right if
    any sample is."""
    samples = [scores[i::n_examples] for i in range(n_examples)]
    return [Score(max(s.reward for s in group),
                  None if group[0].correct is None else any(s.correct for s in group)) for group in samples]


def compare_scores(base, adapted) -> dict[str, int]:
    """Per-example outcome counts: verdicts where the task gives them, else reward up / down / equal."""
    counts = {"improvements": 0, "regressions": 0, "both_right": 0, "both_wrong": 0, "unchanged": 0}
    for b, a in zip(base, adapted):
        if b.correct is not None and a.correct is not None:
            key = {(False, True): "improvements", (True, False): "regressions",
                   (True, True): "both_right", (False, False): "both_wrong"}[(b.correct, a.correct)]
        else:
            key = "improvements" if a.reward > b.reward else "regressions" if a.reward < b.reward else "unchanged"
        counts[key] += 1
    return counts


def sign_test(comparison: dict[str, int]) -> float | None:
    """Two-sided exact sign test of improvements against regressions (ties left out)."""
    up, down = comparison["improvements"], comparison["regressions"]
    n = up + down
    if n == 0:
        return None
    tail = sum(math.comb(n, i) for i in range(min(up, down) + 1)) / 2**n
    return min(1.0, 2 * tail)
