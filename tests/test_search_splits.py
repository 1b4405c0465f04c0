"""A search's train / validation / test splits: disjoint, seeded, recorded once, reused exactly on resume,
and refused with a clear error when they would overlap or be empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evolm.config import load_config
from evolm.search.config import SearchRunConfig
from evolm.search.splits import SPLITS_FILE, plan_splits, record_splits, recorded_splits, write_once
from evolm.tasks import TaskError, load_task


def write_rows(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(start, start + n)))
    return path


def config(*overrides: str) -> SearchRunConfig:
    return load_config("gsm8k", ["model.name_or_path=x", *overrides], SearchRunConfig, presets="evolm.presets.search")


def questions(examples) -> list[str]:
    return [ex.prompt[-1]["content"] for ex in examples]


def test_splits_are_disjoint_sized_and_seeded(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 100)
    task = load_task("gsm8k")
    sizes = [f"task.train={data}", "task.train_size=50", "task.test_size=30", "splits.validation_size=20"]
    splits = plan_splits(task, config(*sizes))
    parts = [questions(splits.train), questions(splits.validation), questions(splits.test)]
    assert [len(p) for p in parts] == [50, 20, 30] and len(set().union(*parts)) == 100
    assert [r["split"] for r in splits.records] == ["train", "validation", "test"]
    assert questions(plan_splits(task, config(*sizes)).test) == parts[2]  # same seed, same rows
    assert questions(plan_splits(task, config(*sizes, "seed=1")).test) != parts[2]
    # without sizes: a tenth of the rows each for validation and test, the rest to train on
    default = plan_splits(task, config(f"task.train={data}", "task.train_size=null", "task.test_size=null",
                                       "splits.validation_size=null"))
    assert (len(default.train), len(default.validation), len(default.test)) == (80, 10, 10)


def test_a_test_source_gives_the_test_split(tmp_path):
    task = load_task("gsm8k")
    train, test = write_rows(tmp_path / "train.jsonl", 40), write_rows(tmp_path / "test.jsonl", 12, start=100)
    splits = plan_splits(task, config(f"task.train={train}", f"task.test={test}", "task.train_size=null",
                                      "task.test_size=null", "splits.validation_size=10"))
    assert questions(splits.test) == questions(task.load_split("test", str(test)))
    assert (len(splits.train), len(splits.validation)) == (30, 10)
    assert splits.records[2] | {"rows": None} == {"split": "test", "of": "test", "source": str(test), "rows": None,
                                                  "digest": splits.records[2]["digest"]}


def test_splits_that_would_overlap_or_be_empty_are_refused(tmp_path):
    task = load_task("gsm8k")
    data = write_rows(tmp_path / "rows.jsonl", 40)
    with pytest.raises(TaskError, match=r"40 rows leave nothing to train on after holding out 25 validation and "
                                        r"15 test rows; lower splits.validation_size or task.test_size"):
        plan_splits(task, config(f"task.train={data}", "task.test_size=15", "splits.validation_size=25"))
    with pytest.raises(TaskError, match="a question is in both the train and the test split"):
        plan_splits(task, config(f"task.train={data}", f"task.test={data}[30:]", "splits.validation_size=5"))
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text(data.read_text() * 2)
    with pytest.raises(TaskError, match="or the data repeats a question"):
        plan_splits(task, config(f"task.train={repeated}", "splits.validation_size=5", "task.test_size=5"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskError, match="the test split is empty"):
        plan_splits(task, config(f"task.train={data}", f"task.test={empty}", "splits.validation_size=5"))


def test_a_resumed_run_reads_the_recorded_rows_and_refuses_changed_data(tmp_path):
    task = load_task("gsm8k")
    data = write_rows(tmp_path / "rows.jsonl", 60)
    run = tmp_path / "run"
    run.mkdir()
    planned = plan_splits(task, config(f"task.train={data}", "task.test_size=10", "splits.validation_size=10"))
    record_splits(run, planned)
    again = recorded_splits(task, run)
    for name in ("train", "validation", "test"):
        assert questions(getattr(again, name)) == questions(getattr(planned, name))
    write_rows(data, 60, start=1)  # the file changed under the run
    with pytest.raises(TaskError, match=f"changed since this run started: its train rows are not the ones recorded "
                                        f"in {run / SPLITS_FILE}"):
        recorded_splits(task, run)
    with pytest.raises(TaskError, match="started before evolm recorded a search's splits"):
        recorded_splits(task, tmp_path)


def test_a_run_file_is_written_once(tmp_path):
    path = tmp_path / "once.jsonl"
    assert write_once(path, "first\n") and not write_once(path, "second\n")
    assert path.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["once.jsonl"]
