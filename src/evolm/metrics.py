"""What a run's numbers mean, wherever they are read (runs, reports, comparisons, `runs list`): the metric
a set is judged by, and a generation's fitness statistics. Plain numbers only, no model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

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
