"""Figures for an ES or GRPO run folder: how fitness (reward) evolved, how large each update was and where the
time went; and a table of where each evaluation set started, ended and stood at the best θ.

Figures are drawn on bare `matplotlib.figure.Figure` objects (Agg rendering, no pyplot), so making
them never changes the caller's matplotlib backend or global state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from evolm.metrics import headline_metric_name
from evolm.runs import RunDir, evaluations_by_set, read_jsonl

PHASES = ("generate", "score", "update", "eval")
DPI = 100


def _evaluations(run_dir: Path, history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Evaluations by set from results/evaluations.jsonl, else the test split's from the history's `test`
    entries (runs made before evaluations.jsonl existed)."""
    rows = read_jsonl(RunDir(run_dir).evaluations_file)
    if rows:
        return evaluations_by_set(rows)
    tests = [{"generation": h["generation"], **h["test"]} for h in history if h.get("test")]
    return {"test": tests} if tests else {}


def _save(fig: Figure, run_dir: Path, name: str) -> Path:
    path = RunDir(run_dir).figures / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def step_key(rows: list[dict[str, Any]]) -> str:
    """What a run's rows count by: ES generations, or GRPO optimizer steps."""
    return "step" if rows and "step" in rows[0] else "generation"


def _integer_generations(ax: Axes, key: str = "generation") -> None:
    """Generations (steps) are counts: no tick at 0.5 between two of them."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel(key)


def evolution_figure(run_dir: str | Path) -> Figure | None:
    """Training fitness (ES: mean with its 20th-80th percentile band, best member; GRPO: the mean reward of a
    step's completions, ± their standard deviation) above the held-out metric of each evaluation set (the test
    split and eval.sets), a line per set.

    The test metric has a panel of its own, sharing the generation axis: on a twin y-axis its line lay
    over the mean fitness and hid it.
    """
    run_dir = Path(run_dir)
    history = read_jsonl(RunDir(run_dir).history_file)
    evaluations = _evaluations(run_dir, history)
    if not history and not evaluations:
        return None
    key = step_key(history or next(iter(evaluations.values())))
    both = bool(history and evaluations)
    fig = Figure(figsize=(7, 5 if both else 4), layout="constrained")
    panels = fig.subplots(2 if both else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 2] if both else None)[:, 0]
    fig.suptitle("Evolution" if key == "generation" else "Training")
    if history:
        ax = panels[0]
        steps = [h[key] for h in history]
        if key == "generation":
            ax.fill_between(steps, [h["p20"] for h in history], [h["p80"] for h in history],
                            alpha=0.25, color="C0", label="20th-80th percentile")
            ax.plot(steps, [h["mean"] for h in history], color="C0", label="mean fitness")
            ax.plot(steps, [h["max"] for h in history], color="C1", linewidth=0.8, label="best member")
        else:
            ax.fill_between(steps, [h["mean"] - h["reward_std"] for h in history],
                            [h["mean"] + h["reward_std"] for h in history], alpha=0.25, color="C0", label="± std")
            ax.plot(steps, [h["mean"] for h in history], color="C0", label="mean reward of the step's completions")
        ax.set_ylabel("training fitness\n(mean reward)")
        ax.legend(loc="best", fontsize="small")
    if evaluations:
        ax = panels[-1]
        labels = []
        for k, (name, rows) in enumerate(evaluations.items()):  # a line per evaluation set
            metric = headline_metric_name(rows)
            ax.plot([e[key] for e in rows], [e[metric] for e in rows],
                    color=f"C{2 + k}", marker="o", markersize=4, label=f"{name} {metric}")
            labels.append(f"{name} {metric}")
        ax.set_ylabel(labels[0] if len(labels) == 1 else "held-out metric")
        ax.legend(loc="best", fontsize="small")
    for ax in panels:
        ax.grid(alpha=0.3)
    _integer_generations(panels[-1], key)
    return fig


def time_breakdown_figure(run_dir: str | Path) -> Figure | None:
    """Seconds per generation (step) spent generating, scoring, updating, evaluating, stacked."""
    history = read_jsonl(RunDir(run_dir).history_file)
    if not history:
        return None
    extra = sorted({phase for h in history for phase in h.get("time", {})} - set(PHASES))
    key = step_key(history)
    generations = [h[key] for h in history]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    bottom = [0.0] * len(history)
    for phase in (*PHASES, *extra):
        # a part of a phase ("generate.noise") is drawn on its own and taken out of its phase's bar
        parts = [p for p in extra if p.startswith(phase + ".")]
        seconds = [float(h.get("time", {}).get(phase, 0.0)) - sum(h.get("time", {}).get(p, 0.0) for p in parts)
                   for h in history]
        ax.bar(generations, seconds, bottom=bottom, width=1.0 if len(history) > 50 else 0.8, label=phase)
        bottom = [b + s for b, s in zip(bottom, seconds)]
    _integer_generations(ax, key)
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_title(f"Time per {key}")
    return fig


def update_norm_figure(run_dir: str | Path) -> Figure | None:
    """The L2 norm of each generation's update of θ (step_norm) above that of the gradient estimate it came from
    (gradient_norm), over all evolving weights: how far each generation moved the model, the drift that
    forgetting on other tasks would come from. None for a history without them (GRPO, runs before the norms)."""
    history = [h for h in read_jsonl(RunDir(run_dir).history_file) if "step_norm" in h]
    if not history:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    step_ax, gradient_ax = fig.subplots(2, 1, sharex=True)
    generations = [h["generation"] for h in history]
    step_ax.plot(generations, [h["step_norm"] for h in history], color="C0", label="update ‖Δθ‖")
    gradient_ax.plot(generations, [h["gradient_norm"] for h in history], color="C1", label="gradient estimate")
    step_ax.set_ylabel("update norm")
    gradient_ax.set_ylabel("gradient norm")
    fig.suptitle("Norm of each generation's update")
    for ax in (step_ax, gradient_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    _integer_generations(gradient_ax)
    return fig


def plot_evolution(run_dir: str | Path) -> Path | None:
    """figures/evolution.png, or None before the run has any history or evaluation."""
    fig = evolution_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir), "evolution.png")


def plot_time_breakdown(run_dir: str | Path) -> Path | None:
    """figures/time_breakdown.png, or None before the first generation."""
    fig = time_breakdown_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir), "time_breakdown.png")


def plot_update_norm(run_dir: str | Path) -> Path | None:
    """figures/update_norm.png, or None for a history without update norms."""
    fig = update_norm_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir), "update_norm.png")


def write_figures(run_dir: str | Path) -> list[Path]:
    """Every figure the run's results allow; none (and no error) for a run with no history yet."""
    paths = (plot_evolution(run_dir), plot_update_norm(run_dir), plot_time_breakdown(run_dir))
    return [path for path in paths if path is not None]


def evaluations_table(run_dir: str | Path) -> str | None:
    """Each evaluation set's headline metric at the base (step 0), at the last evaluation and, where the run keeps
    a best θ (eval.keep_best), at the best one, with the change from the base: a Markdown table, None before any
    evaluation. KL to the base follows where the run measured it (eval.kl)."""
    run = RunDir(run_dir)
    by_set = evaluations_by_set(read_jsonl(run.evaluations_file))
    if not by_set:
        return None
    key = step_key(next(iter(by_set.values())))
    last = max(row[key] for rows in by_set.values() for row in rows)
    columns = [("base", 0), ("last", last)]
    if run.best_file.is_file():
        best = json.loads(run.best_file.read_text())
        columns.append((f"best on {best['set']}", best["generation"]))
    lines = ["| set | metric | " + " | ".join(f"{name} ({key} {step})" for name, step in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, rows in by_set.items():
        metric = headline_metric_name(rows)
        at = {row[key]: row for row in rows}
        base = at.get(0, {}).get(metric)
        cells = [_metric_cell(at.get(step), metric, base if step else None) for _, step in columns]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_cell(row: dict[str, Any] | None, metric: str, base: float | None) -> str:
    """An evaluation's metric (accuracy in percent), its change from `base`, and its KL to the base if measured."""
    if row is None or row.get(metric) is None:
        return "—"
    value = row[metric]
    percent = metric == "accuracy"
    text = f"{100 * value:.1f} %" if percent else f"{value:.4g}"
    if base is not None:
        text += f" ({100 * (value - base):+.1f} pt)" if percent else f" ({value - base:+.4g})"
    if row.get("kl") is not None:
        text += f", KL {row['kl']:.3g}"
    return text
