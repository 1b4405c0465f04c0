"""The run lifecycle both commands share: the folder, the resume check, the log file, the splits."""

from __future__ import annotations

import logging

import pytest

from evolm.config import TaskConfig
from evolm.runs import (
    RunDir,
    RunDirError,
    atomic_write_bytes,
    atomic_write_text,
    changed_keys,
    is_under,
    list_runs,
    log_to_file,
)
from evolm.tasks import Example, Score, Task, TaskError
from evolm.tasks.splits import load_splits


class NumberedTask(Task):
    """`records` examples per source, named after it, so a test sees where each example came from."""

    name = "numbered"

    def __init__(self, records: int = 10):
        self.records = records

    def load_split(self, split, source):
        return [Example(f"{source or split} {i}") for i in range(self.records)]

    def score(self, completion, example):
        return Score(0.0)


def prompts(examples: list[Example]) -> list[str]:
    return [ex.prompt for ex in examples]


def test_changed_keys_names_every_differing_leaf_by_its_dotted_path():
    saved = {"seed": 0, "model": {"name": "a", "device": "cpu"}, "task": {"options": {}}, "space": {"rank": 2}}
    wanted = {"seed": 0, "model": {"name": "a", "device": "cuda"}, "task": {"options": {"n": 3}},
              "space": {"rank": 2, "alpha": 1.0}}
    assert changed_keys(saved, wanted) == ["model.device", "space.alpha", "task.options", "task.options.n"]
    assert changed_keys(saved, saved) == []


def test_is_under_matches_whole_sections_only():
    assert is_under("space.rank", ["space"]) and is_under("space", ["space"])
    assert not is_under("spaces.rank", ["space"]) and not is_under("model.device_map", ["model.device"])


def test_log_to_file_writes_while_open_and_lets_go_after(tmp_path):
    path = tmp_path / "logs" / "run.log"
    logger = logging.getLogger("evolm")
    handlers, level = list(logger.handlers), logger.level
    with log_to_file(path):
        logging.getLogger("evolm.search").info("inside")
    logging.getLogger("evolm").info("after")
    assert "INFO inside" in path.read_text() and "after" not in path.read_text()
    assert logger.handlers == handlers and logger.level == level
    with log_to_file(None):  # a rank other than 0
        logger.info("no file")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs", "run.log"]


def test_run_dir_create_refuses_a_busy_folder_and_leaves_no_empty_subfolders(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "config.yaml").write_text("output_dir: busy\n")
    with pytest.raises(RunDirError, match="--overwrite"):
        RunDir.create(tmp_path / "busy", overwrite=False)
    run = RunDir.create(tmp_path / "busy", overwrite=True)
    assert run.root.is_dir() and not any(run.root.iterdir())


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not an evolm run \(no config.yaml\)"):
        RunDir.create(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_atomic_write_leaves_the_old_file_and_no_temporary_one_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails inside the write, after the temporary file exists
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"garbage"])
def test_an_unreadable_checkpoint_is_a_run_dir_error_that_says_what_to_do(tmp_path, content):
    run = RunDir(tmp_path)
    run.checkpoint_file.parent.mkdir()
    run.checkpoint_file.write_bytes(content)
    with pytest.raises(RunDirError, match="unreadable .*delete it to restart this run from generation 0"):
        run.load_checkpoint()


def test_runs_list_names_paths_relative_to_the_root_and_refuses_a_missing_root(tmp_path):
    for name in ("a/deep/run-1", "b"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("{}")
    assert sorted(r["path"] for r in list_runs(tmp_path)) == ["a/deep/run-1", "b"]
    with pytest.raises(RunDirError, match="is not a folder"):
        list_runs(tmp_path / "missing")


def test_load_splits_without_hold_out_reads_each_split_from_its_source():
    task = NumberedTask()
    config = TaskConfig(name="numbered", train="a.jsonl", train_size=3, test_size=2)
    train, test = load_splits(task, config, hold_out=False)
    assert prompts(train) == ["a.jsonl 0", "a.jsonl 1", "a.jsonl 2"] and prompts(test) == ["test 0", "test 1"]
    assert load_splits(NumberedTask(), TaskConfig(name="numbered"), hold_out=False)[1]  # built-in test split
    with pytest.raises(TaskError, match="task 'numbered': the training split is empty"):
        load_splits(NumberedTask(records=0), TaskConfig(name="numbered"), hold_out=False)


def test_an_empty_test_split_is_an_error_not_a_run_without_metrics(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    task = NumberedTask()
    task.load_split = lambda split, source: [] if source == str(empty) else [Example("x")]
    with pytest.raises(TaskError, match=f"the test split is empty \\({empty}\\); give task.test"):
        load_splits(task, TaskConfig(name="numbered", test=str(empty)), hold_out=False)


def test_load_splits_with_hold_out_keeps_the_last_records_of_a_local_file_for_evaluation():
    config = TaskConfig(name="numbered", train="a.jsonl", test_size=3)
    train, test = load_splits(NumberedTask(), config, hold_out=True)
    assert prompts(train) == [f"a.jsonl {i}" for i in range(7)]
    assert prompts(test) == ["a.jsonl 7", "a.jsonl 8", "a.jsonl 9"]
    default = load_splits(NumberedTask(records=40), TaskConfig(name="numbered", train="a.jsonl"), hold_out=True)
    assert [len(split) for split in default] == [36, 4]  # a tenth held out
    given = TaskConfig(name="numbered", train="a.jsonl", test="b.jsonl", test_size=2)
    assert prompts(load_splits(NumberedTask(), given, hold_out=True)[1]) == ["b.jsonl 0", "b.jsonl 1"]
    with pytest.raises(TaskError, match="leave nothing to train on"):
        load_splits(NumberedTask(records=3), config, hold_out=True)
    with pytest.raises(TaskError, match="has no reference answers"):
        load_splits(NumberedTask(), config, hold_out=True, needs_references=True)
