"""Run-folder figures from a small synthetic history."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.image import imread

from evolm.reports import plot_evolution, plot_time_breakdown, write_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, generations: int = 6, accuracy: bool = True) -> None:
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


def test_figures_are_written(tmp_path):
    write_run(tmp_path)
    paths = write_figures(tmp_path)
    assert paths == [tmp_path / "figures" / "evolution.png", tmp_path / "figures" / "time_breakdown.png"]
    for path in paths:
        assert_small_png(path)


def test_reward_is_plotted_when_accuracy_is_absent(tmp_path):
    write_run(tmp_path, accuracy=False)
    assert_small_png(plot_evolution(tmp_path))


def test_running_run_with_half_written_line_and_no_evaluations_file(tmp_path):
    write_run(tmp_path, generations=60)
    (tmp_path / "results" / "evaluations.jsonl").unlink()  # the history's test entries are used instead
    with open(tmp_path / "results" / "history.jsonl", "a") as f:
        f.write('{"generation": 60, "fitn')
    assert_small_png(plot_evolution(tmp_path))
    assert_small_png(plot_time_breakdown(tmp_path))


def test_empty_or_missing_history_does_not_crash(tmp_path):
    assert write_figures(tmp_path / "no-such-run") == []
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "history.jsonl").write_text("")
    assert write_figures(tmp_path) == []
    (tmp_path / "results" / "evaluations.jsonl").write_text(json.dumps({"generation": 0, "reward": -3.0, "accuracy": None}))
    assert write_figures(tmp_path) == [tmp_path / "figures" / "evolution.png"]  # the base model's score alone
