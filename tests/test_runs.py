"""The run lifecycle both commands share: the folder, the resume check, the log file, the splits."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evolm

from evolm.config import TaskConfig
from evolm.runs import (
    EXPORT_INFO,
    RUN_FORMAT,
    RUN_MARKER,
    RunDir,
    RunDirError,
    atomic_write_bytes,
    atomic_write_text,
    changed_keys,
    cleanup_candidates,
    cleanup_runs,
    fresh_dir_beside,
    is_under,
    list_runs,
    log_to_file,
    refuse_foreign_export_dir,
    replace_dir,
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
    old = RunDir.create(tmp_path / "busy", overwrite=False)
    old.config_file.write_text("output_dir: busy\n")
    with pytest.raises(RunDirError, match="--overwrite"):
        RunDir.create(tmp_path / "busy", overwrite=False)
    run = RunDir.create(tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in run.root.iterdir()) == [RUN_MARKER]
    assert json.loads(run.marker_file.read_text()) == {"format": RUN_FORMAT}


@pytest.mark.parametrize("files", [{"notes.txt": "mine"}, {"config.yaml": "app: mine", "main.py": "print(1)"}],
                         ids=["any folder", "another program's folder with a config.yaml"])
def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, files):
    for name, text in files.items():
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / name).write_text(text)
    with pytest.raises(RunDirError, match=r"not an evolm run \(no \.evolm-run marker\)"):
        RunDir.create(tmp_path / "mine", overwrite=True)
    assert {p.name: p.read_text() for p in (tmp_path / "mine").iterdir()} == files


def older_run(path: Path) -> RunDir:
    """A run folder as evolm wrote it before run markers: config.yaml and results, no marker."""
    run = RunDir(path)
    run.history_file.parent.mkdir(parents=True)
    run.config_file.write_text("output_dir: x\n")
    run.history_file.write_text(json.dumps({"generation": 0, "mean": 0.5}) + "\n")
    return run


def test_a_run_of_an_older_evolm_is_listed_but_never_deleted_until_a_writer_marks_it(tmp_path):
    old = older_run(tmp_path / "old")
    with pytest.raises(RunDirError, match="older evolm .*--resume"):
        RunDir.create(old.root, overwrite=True)
    rows = list_runs(tmp_path)
    assert [(r["path"], r["marked"]) for r in rows] == [("old", False)] and cleanup_candidates(rows, 0) == ([], ["old"])
    assert cleanup_runs(tmp_path, ["old"]) == [] and old.config_file.is_file()
    with old.lock():  # what --resume does
        pass
    assert old.is_marked and cleanup_candidates(list_runs(tmp_path), 0) == (["old"], [])


def test_cleanup_deletes_only_marked_runs_beyond_keep_and_none_that_a_process_holds(tmp_path):
    app = tmp_path / "app"  # another program's folder among the runs
    app.mkdir()
    (app / "config.yaml").write_text("port: 80\n")
    runs = []
    for name in ("a", "b", "c"):
        runs.append(RunDir.create(tmp_path / name, overwrite=False))
        runs[-1].config_file.write_text("output_dir: x\n")
        for file in runs[-1].root.iterdir():  # a newer than b, b newer than c
            os.utime(file, (time.time() - 100 * len(runs), time.time() - 100 * len(runs)))
    rows = list_runs(tmp_path)
    assert [r["path"] for r in rows] == ["a", "b", "c"]  # newest first; the app folder is no run
    doomed, _ = cleanup_candidates(rows, keep=1)
    assert doomed == ["b", "c"]
    holder = hold_lock(runs[1])
    try:
        assert cleanup_runs(tmp_path, doomed) == ["c"]
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "app", "b"]
    assert (app / "config.yaml").read_text() == "port: 80\n"


def hold_lock(run: RunDir, shared: bool = False) -> subprocess.Popen:
    """A real second process that takes the run's lock and waits, printing `held` once it has it."""
    code = (f"import sys, time; from evolm.runs import RunDir\nwith RunDir({str(run.root)!r}).lock(shared={shared}):"
            "\n    print('held', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(Path(evolm.__file__).parents[1])))
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_holder_leaves_no_lock(tmp_path):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    holder = hold_lock(run)
    with pytest.raises(RunDirError, match=rf"in use by another process \(pid {holder.pid}\)"):
        with run.lock():
            pass
    with pytest.raises(RunDirError, match="in use"):  # nor may --overwrite delete it under the writer
        RunDir.create(run.root, overwrite=True)
    holder.send_signal(signal.SIGKILL)  # kill -9: the lock file stays behind, naming a dead process
    holder.wait()
    assert f"pid {holder.pid}" in run.lock_file.read_text()
    with run.lock():
        assert run.lock_file.read_text() == f"pid {os.getpid()}\n"


def test_search_workers_share_a_run_but_exclude_a_writer(tmp_path):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    worker = hold_lock(run, shared=True)
    try:
        with run.lock(shared=True):  # a second worker joins
            pass
        with pytest.raises(RunDirError, match="in use by another process"):
            with run.lock():
                pass
    finally:
        worker.kill()
        worker.wait()


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    """A run folder from someone else: its checkpoint is a pickle whose loading would create a file."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = RunDir(tmp_path / "shared-run")
    run.checkpoint_file.parent.mkdir(parents=True)
    torch.save({"strategy": {"generation": 0}, "x": Payload()}, run.checkpoint_file)
    with pytest.raises(RunDirError, match="not weights only"):
        run.load_checkpoint()
    assert not marker.exists()


def test_runs_list_survives_a_truncated_summary(tmp_path):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    run.config_file.write_text("output_dir: x\n")
    run.summary_file.parent.mkdir()
    run.summary_file.write_text('{"status": "fini')
    assert [r["status"] for r in list_runs(tmp_path)] == ["summary.json unreadable"]


@pytest.mark.parametrize("content", ["thesis", "two runs", "the run itself"])
def test_export_refuses_to_replace_anything_but_an_earlier_export(tmp_path, content):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    run.config_file.write_text("output_dir: x\n")
    out = {"thesis": tmp_path / "thesis", "two runs": tmp_path, "the run itself": run.root}[content]
    out.mkdir(exist_ok=True)
    (out / "chapter1.tex").write_text("years of work")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirError, match="run folder|not an earlier evolm export"):
        refuse_foreign_export_dir(out, run)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / EXPORT_INFO).write_text("{}")
    refuse_foreign_export_dir(earlier, run)  # an earlier export may be replaced
    refuse_foreign_export_dir(tmp_path / "new", run)


def test_replace_dir_keeps_folders_of_the_user_named_like_its_temporaries(tmp_path):
    final = tmp_path / "adapter"
    for name in ("adapter.old", "adapter.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    for version in ("1", "2"):
        tmp = fresh_dir_beside(final)
        (tmp / "weights").write_text(version)
        replace_dir(tmp, final)
    assert (final / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.old", "adapter.tmp"]
    assert (tmp_path / "adapter.old" / "mine.txt").read_text() == "mine"


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
        RunDir.create(tmp_path / name, overwrite=False).config_file.write_text("{}")
    assert sorted(r["path"] for r in list_runs(tmp_path)) == ["a/deep/run-1", "b"]
    with pytest.raises(RunDirError, match="is not a folder"):
        list_runs(tmp_path / "missing")


def test_load_splits_reads_each_split_from_its_source():
    task = NumberedTask()
    config = TaskConfig(name="numbered", train="a.jsonl", train_size=3, test_size=2)
    train, test = load_splits(task, config)
    assert prompts(train) == ["a.jsonl 0", "a.jsonl 1", "a.jsonl 2"] and prompts(test) == ["test 0", "test 1"]
    assert load_splits(NumberedTask(), TaskConfig(name="numbered"))[1]  # built-in test split
    with pytest.raises(TaskError, match="task 'numbered': the training split is empty"):
        load_splits(NumberedTask(records=0), TaskConfig(name="numbered"))


def test_an_empty_test_split_is_an_error_not_a_run_without_metrics(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    task = NumberedTask()
    task.load_split = lambda split, source: [] if source == str(empty) else [Example("x")]
    with pytest.raises(TaskError, match=f"the test split is empty \\({empty}\\); give task.test"):
        load_splits(task, TaskConfig(name="numbered", test=str(empty)))
