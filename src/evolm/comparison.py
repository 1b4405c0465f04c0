"""Several runs (ES and GRPO alike) on one clock: the test metric against training seconds and against sampled
completions, and a table of where each run ended (`evolm analyze RUN RUN … --out DIR`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from evolm.config import TEST_SET
from evolm.metrics import headline_metric_name
from evolm.reports import DPI, step_key
from evolm.runs import RunDir, RunDirError, atomic_write_text, evaluations_by_set, read_jsonl

CLOCKS = {"time": ("seconds", "training seconds (evaluation excluded)"),
          "completions": ("completions", "sampled completions")}


@dataclass
class RunCurve:
    """One run's test evaluations, each with the clock as it stood."""

    label: str
    optimizer: str
    metric: str  # accuracy where the task gives verdicts, else reward
    rows: list[dict]


def read_curve(run_dir: Path) -> RunCurve:
    run = RunDir.open(run_dir)
    config = yaml.safe_load(run.config_file.read_text()) or {}
    rows = [r for r in evaluations_by_set(read_jsonl(run.evaluations_file)).get(TEST_SET, []) if "seconds" in r]
    if not rows:
        raise RunDirError(f"{run_dir} has no test evaluation with a training clock (seconds, completions); runs made "
                          "before evolm recorded one cannot be compared on it")
    metric = headline_metric_name(rows)
    return RunCurve(label=Path(run_dir).name, optimizer="grpo" if "grpo" in config else "es", metric=metric,
                    rows=rows)


def comparison_figure(curves: list[RunCurve], clock: str) -> Figure:
    """The test metric of each run (a line per run) against one clock: 'time' or 'completions'."""
    field, label = CLOCKS[clock]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for k, curve in enumerate(curves):
        ax.plot([r[field] for r in curve.rows], [r[curve.metric] for r in curve.rows], marker="o", markersize=3,
                color=f"C{k}", label=f"{curve.label} ({curve.optimizer})")
    metrics = sorted({c.metric for c in curves})
    ax.set_xlabel(label)
    ax.set_ylabel(f"test {' / '.join(metrics)}")
    ax.set_title(f"Test {' / '.join(metrics)} against {label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def comparison_table(curves: list[RunCurve]) -> str:
    lines = ["| run | optimizer | final test metric | seconds | completions | last step |",
             "|---|---|---|---|---|---|"]
    for curve in curves:
        last = curve.rows[-1]
        lines.append(f"| {curve.label} | {curve.optimizer} | {curve.metric} {last[curve.metric]:.4g} | "
                     f"{last['seconds']:.1f} | {last['completions']} | {last[step_key([last])]} |")
    return "\n".join(lines) + "\n"


def equal_time_table(curves: list[RunCurve]) -> str:
    """Each run at the clock the shortest one stopped at: its last evaluation at or before those seconds, so
    no run is credited with training time another did not get."""
    shared = min(curve.rows[-1]["seconds"] for curve in curves)
    lines = [f"At equal training time: each run's last test evaluation at or before {shared:.1f} s, the "
             "shortest run's clock.", "",
             "| run | optimizer | test metric | seconds | completions | step |", "|---|---|---|---|---|---|"]
    for curve in curves:
        row = [r for r in curve.rows if r["seconds"] <= shared][-1]
        lines.append(f"| {curve.label} | {curve.optimizer} | {curve.metric} {row[curve.metric]:.4g} | "
                     f"{row['seconds']:.1f} | {row['completions']} | {row[step_key([row])]} |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """DIR/compare_time.png, DIR/compare_completions.png and DIR/compare.md for the runs."""
    curves = [read_curve(Path(r)) for r in run_dirs]
    labels = [c.label for c in curves]
    if len(set(labels)) < len(labels):  # folders of one name from different places: their paths tell them apart
        for curve, run_dir in zip(curves, run_dirs):
            curve.label = str(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for clock in CLOCKS:
        path = out / f"compare_{clock}.png"
        comparison_figure(curves, clock).savefig(path, dpi=DPI)
        written.append(path)
    table = out / "compare.md"
    atomic_write_text(table, "# Runs on one clock\n\n" + comparison_table(curves) + "\n"
                      + equal_time_table(curves))
    return written + [table]
