"""Run-folder figures and the evaluation table from a small synthetic history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread
from typer.testing import CliRunner

from evolm.cli import app
from evolm.reports import (
    evaluations_table,
    evolution_figure,
    plot_evolution,
    plot_time_breakdown,
    time_breakdown_figure,
    update_norm_figure,
    write_figures,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, generations: int = 6, accuracy: bool = True, norms: bool = True) -> None:
    """An ES run's results: evaluations at even generations and the final one; `norms`: the history rows carry
    the update's norms (step_norm = 0.5 + g, gradient_norm = 1000 · (0.5 + g))."""
    results = run_dir / "results"
    results.mkdir(parents=True)
    lines, evaluations = [], []
    for g in range(generations):
        fitness = [0.1 * g + 0.01 * i for i in range(8)]
        row = {
            "generation": g, "fitness": fitness, "mean": sum(fitness) / 8, "std": 0.02,
            "min": min(fitness), "max": max(fitness), "p20": fitness[1], "p80": fitness[6],
            "tokens": 1000, "tokens_per_s": 500.0,
            "time": {"generate": 1.5, "score": 0.1, "update": 0.2, "eval": 0.7 if g % 2 == 0 else 0.0},
        }
        if norms:
            row |= {"step_norm": 0.5 + g, "gradient_norm": 1000 * (0.5 + g)}
        if g % 2 == 0:
            evaluations.append({"generation": g, "reward": 0.2 * g, "accuracy": 0.1 * g if accuracy else None})
            row["test"] = {"reward": 0.2 * g, "accuracy": evaluations[-1]["accuracy"]}
        lines.append(json.dumps(row))
    evaluations.append({"generation": generations, "reward": 1.0, "accuracy": 0.5 if accuracy else None})
    (results / "history.jsonl").write_text("\n".join(lines) + "\n")
    (results / "evaluations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evaluations))


def assert_small_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert 300 <= width <= 1000 and 200 <= height <= 800


def drawn(ax) -> dict[str, tuple[list, list]]:
    """{label: (x, y)} of the lines an axes draws."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def bar_heights(ax) -> dict[str, list[float]]:
    return {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}


def test_figures_are_written_and_draw_the_history(tmp_path):
    write_run(tmp_path)
    paths = write_figures(tmp_path)
    assert paths == [tmp_path / "figures" / name for name in ("evolution.png", "update_norm.png", "time_breakdown.png")]
    for path in paths:
        assert_small_png(path)
    fitness_ax, test_ax = evolution_figure(tmp_path).axes
    lines = drawn(fitness_ax)
    assert lines["mean fitness"][0] == list(range(6))
    assert lines["mean fitness"][1] == pytest.approx([0.1 * g + 0.035 for g in range(6)])
    assert lines["best member"][1] == pytest.approx([0.1 * g + 0.07 for g in range(6)])
    assert drawn(test_ax)["test accuracy"] == ([0, 2, 4, 6], pytest.approx([0.0, 0.2, 0.4, 0.5]))
    heights = bar_heights(time_breakdown_figure(tmp_path).axes[0])
    assert heights["generate"] == [1.5] * 6 and heights["eval"] == [0.7, 0, 0.7, 0, 0.7, 0]


def test_reward_is_plotted_when_accuracy_is_absent(tmp_path):
    write_run(tmp_path, accuracy=False)
    assert_small_png(plot_evolution(tmp_path))
    lines = drawn(evolution_figure(tmp_path).axes[1])
    assert list(lines) == ["test reward"] and lines["test reward"] == ([0, 2, 4, 6], pytest.approx([0, 0.4, 0.8, 1.0]))


def test_running_run_with_half_written_line_and_no_evaluations_file(tmp_path):
    write_run(tmp_path, generations=60)
    (tmp_path / "results" / "evaluations.jsonl").unlink()  # the history's test entries are used instead
    with open(tmp_path / "results" / "history.jsonl", "a") as f:
        f.write('{"generation": 60, "fitn')
    assert_small_png(plot_evolution(tmp_path))
    assert_small_png(plot_time_breakdown(tmp_path))
    fitness_ax, test_ax = evolution_figure(tmp_path).axes
    assert drawn(fitness_ax)["mean fitness"][0] == list(range(60))  # the half-written line is left out
    assert drawn(test_ax)["test accuracy"][0] == list(range(0, 60, 2))
    assert len(bar_heights(time_breakdown_figure(tmp_path).axes[0])["generate"]) == 60


def test_empty_or_missing_history_does_not_crash(tmp_path):
    assert write_figures(tmp_path / "no-such-run") == []
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "history.jsonl").write_text("")
    assert write_figures(tmp_path) == []
    (tmp_path / "results" / "evaluations.jsonl").write_text(json.dumps({"generation": 0, "reward": -3.0, "accuracy": None}))
    assert write_figures(tmp_path) == [tmp_path / "figures" / "evolution.png"]  # the base model's score alone


def visible_tick_labels(ax) -> list[str]:
    low, high = sorted(ax.get_xlim())
    return [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]


@pytest.mark.parametrize("generations", [1, 3, 6, 60])
@pytest.mark.parametrize("make_figure", [evolution_figure, time_breakdown_figure])
def test_generation_ticks_are_whole_numbers(tmp_path, generations, make_figure):
    write_run(tmp_path, generations=generations)
    fig = make_figure(tmp_path)
    fig.draw_without_rendering()  # lays out the ticks and their labels
    labels = visible_tick_labels(fig.axes[-1])
    assert labels and all(label.isdigit() for label in labels), labels  # no 0.5, no -0.5 (or −1)


def test_test_metric_does_not_share_the_fitness_axes(tmp_path):
    write_run(tmp_path)
    fitness_ax, test_ax = evolution_figure(tmp_path).axes
    assert {line.get_label() for line in fitness_ax.get_lines()} == {"mean fitness", "best member"}
    assert [line.get_label() for line in test_ax.get_lines()] == ["test accuracy"]
    assert fitness_ax.get_shared_x_axes().joined(fitness_ax, test_ax)


def test_a_part_of_a_phase_is_taken_out_of_its_bar(tmp_path):
    write_run(tmp_path, generations=3)
    history = tmp_path / "results" / "history.jsonl"
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    for row in rows:
        row["time"]["generate.noise"] = 0.5
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heights = bar_heights(time_breakdown_figure(tmp_path).axes[0])
    assert heights["generate"] == [1.0] * 3 and heights["generate.noise"] == [0.5] * 3  # stacked, not counted twice


def test_figure_modules_leave_matplotlibs_backend_alone():
    """Importing them must not switch the caller's backend (search/analysis.py used to call matplotlib.use)."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); import evolm.reports, evolm.search.analysis; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_update_norm_is_plotted_per_generation(tmp_path):
    write_run(tmp_path)
    step_ax, gradient_ax = update_norm_figure(tmp_path).axes
    assert drawn(step_ax) == {"update ‖Δθ‖": (list(range(6)), pytest.approx([0.5 + g for g in range(6)]))}
    assert drawn(gradient_ax) == {"gradient estimate": (list(range(6)), pytest.approx([1000 * (0.5 + g)
                                                                                      for g in range(6)]))}
    assert step_ax.get_shared_x_axes().joined(step_ax, gradient_ax)


def test_a_history_without_update_norms_draws_no_norm_figure(tmp_path):
    write_run(tmp_path, norms=False)  # a GRPO run, or an ES run from before the norms were recorded
    assert update_norm_figure(tmp_path) is None
    assert [p.name for p in write_figures(tmp_path)] == ["evolution.png", "time_breakdown.png"]


def write_sets_run(run_dir: Path) -> Path:
    """A run folder with a test split (accuracy, KL), a set scored by reward only, evaluated at 0, 10 and 20,
    and a best θ at generation 10 on `val`; `late` was first scored at generation 10."""
    (run_dir / "results").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"es": {}, "task": {"name": "gsm8k-boxed"}}))
    rows = []
    for g, accuracy, reward, kl in [(0, 0.625, 0.5, 0.0), (10, 0.70, 0.25, 1.5), (20, 0.60, 0.75, 3.0)]:
        rows += [{"generation": g, "set": "test", "reward": accuracy, "accuracy": accuracy, "kl": kl},
                 {"generation": g, "set": "val", "reward": accuracy + 0.1, "accuracy": accuracy + 0.1},
                 {"generation": g, "set": "plain", "reward": reward, "accuracy": None}]
    rows += [{"generation": g, "set": "late", "reward": 0.5, "accuracy": 0.5} for g in (10, 20)]
    (run_dir / "results" / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = {"set": "val", "metric": "accuracy", "value": 0.8, "generation": 10}
    (run_dir / "results" / "best.json").write_text(json.dumps(best))
    return run_dir


def test_the_evaluation_table_gives_every_set_at_base_last_and_best(tmp_path):
    table = evaluations_table(write_sets_run(tmp_path)).splitlines()
    assert table[0] == "| set | metric | base (generation 0) | last (generation 20) | best on val (generation 10) |"
    assert table[2:] == [
        "| test | accuracy | 62.5 %, KL 0 | 60.0 % (-2.5 pt), KL 3 | 70.0 % (+7.5 pt), KL 1.5 |",
        "| val | accuracy | 72.5 % | 70.0 % (-2.5 pt) | 80.0 % (+7.5 pt) |",
        "| plain | reward | 0.5 | 0.75 (+0.25) | 0.25 (-0.25) |",
        "| late | accuracy | — | 50.0 % | 50.0 % |",
    ]
    (tmp_path / "results" / "best.json").unlink()  # a run without eval.keep_best
    assert evaluations_table(tmp_path).splitlines()[0] == "| set | metric | base (generation 0) | last (generation 20) |"


def test_analyze_prints_the_evaluation_table_of_a_run(tmp_path):
    run = write_sets_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["analyze", str(run)])
    assert result.exit_code == 0, result.output
    assert evaluations_table(run) in result.output  # whole lines, unwrapped
    empty = tmp_path / "empty"
    (empty / "results").mkdir(parents=True)
    (empty / "config.yaml").write_text("es: {}\n")
    assert "| set |" not in CliRunner().invoke(app, ["analyze", str(empty)]).output
