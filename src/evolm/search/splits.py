"""A search's three splits: train, validation (fitness, selection) and test (scored once, at the end).

The validation rows, and the test rows unless task.test gives them, are held out of task.train by a
shuffle seeded with the run's seed. Which rows went where is written once to the run folder
(splits.jsonl: per split its source, row numbers and a digest of their content), so a resumed run
and every worker of it use exactly those rows, and a changed data file is an error, not a new split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from evolm.search.config import SearchRunConfig
from evolm.tasks import Example, Task, TaskError
from evolm.tasks.splits import check_references

SPLITS_FILE = "splits.jsonl"
NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    records: list[dict]  # what splits.jsonl holds: {split, of (the task's split), source, rows, digest}


def write_once(path: Path, text: str) -> bool:
    """Write `path` whole unless it exists (several workers may try at once: the first one's file counts).
    True when this call wrote it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    try:
        os.link(temporary, path)  # atomic, and fails if the file is there
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()


def question_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def digest(examples: list[Example]) -> str:
    content = json.dumps([[ex.prompt, ex.target] for ex in examples], sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _held_out_size(size: int | None, pool: int) -> int:
    return size or max(1, min(200, pool // 10))


def plan_splits(task: Task, config: SearchRunConfig) -> Splits:
    """A new run's splits, checked: none empty, and no question in two of them (the test and validation
    rows must be rows the search never trains on)."""
    if config.training.targets == "reference":
        check_references(task, config.task)
    source = config.task.train
    pool = task.load_split("train", source)
    order = list(range(len(pool)))
    random.Random(f"evolm-search-splits:{config.seed}").shuffle(order)
    test_from_pool = config.task.test is None and source is not None
    test_rows = _held_out_size(config.task.test_size, len(pool)) if test_from_pool else 0
    validation_rows = _held_out_size(config.splits.validation_size, len(pool))
    if test_rows + validation_rows >= len(pool):
        what = f"{validation_rows} validation" + (f" and {test_rows} test" if test_from_pool else "")
        raise TaskError(f"{source or 'the built-in training data'}: {len(pool)} rows leave nothing to train on after "
                        f"holding out {what} rows; lower splits.validation_size or task.test_size, or give task.test")
    rows = {"test": order[:test_rows], "validation": order[test_rows: test_rows + validation_rows],
            "train": order[test_rows + validation_rows:][: config.task.train_size]}
    sources = {"train": source, "validation": source, "test": source}
    of = {"train": "train", "validation": "train", "test": "train"}  # which of the task's splits the rows index
    examples = {name: [pool[i] for i in rows[name]] for name in ("train", "validation")}
    if test_from_pool:
        examples["test"] = [pool[i] for i in rows["test"]]
    else:
        test_pool = task.load_split("test", config.task.test)
        rows["test"] = list(range(min(len(test_pool), config.task.test_size or len(test_pool))))
        sources["test"], of["test"] = config.task.test, "test"
        examples["test"] = [test_pool[i] for i in rows["test"]]
    for name in NAMES:
        if not examples[name]:
            raise TaskError(f"task '{config.task.name}': the {name} split is empty "
                            f"({sources[name] or 'built-in data'})")
    _refuse_overlap(examples)
    records = [{"split": name, "of": of[name], "source": sources[name], "rows": rows[name],
                "digest": digest(examples[name])} for name in NAMES]
    return Splits(examples["train"], examples["validation"], examples["test"], records)


def _refuse_overlap(examples: dict[str, list[Example]]) -> None:
    seen: dict[str, str] = {}
    for name in NAMES:
        for ex in examples[name]:
            other = seen.setdefault(question_key(ex), name)
            if other != name:
                raise TaskError(f"a question is in both the {other} and the {name} split (task.test overlaps "
                                f"task.train, or the data repeats a question): {question_key(ex)[:80]}; the "
                                "validation and test rows must be ones the search never trains on")


def record_splits(run_dir: Path, splits: Splits) -> None:
    write_once(run_dir / SPLITS_FILE, "".join(json.dumps(r) + "\n" for r in splits.records))


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / SPLITS_FILE
    if not path.is_file():
        raise TaskError(f"{run_dir} has no {SPLITS_FILE}: it was started before evolm recorded a search's splits "
                        "and cannot be resumed by this version")
    return [json.loads(line) for line in path.read_text().splitlines()]


def recorded_splits(task: Task, run_dir: Path) -> Splits:
    """The splits a run recorded when it started, loaded from their sources; a source whose recorded rows
    no longer hold the same questions and answers is an error."""
    records = read_records(run_dir)
    loaded: dict[tuple[str, str | None], list[Example]] = {}
    examples = {}
    for record in records:
        key = (record["of"], record["source"])
        if key not in loaded:
            loaded[key] = task.load_split(*key)
        pool, rows = loaded[key], record["rows"]
        chosen = [pool[i] for i in rows if i < len(pool)]
        if len(chosen) != len(rows) or digest(chosen) != record["digest"]:
            raise TaskError(f"{record['source'] or 'the built-in data'} changed since this run started: its "
                            f"{record['split']} rows are not the ones recorded in {run_dir / SPLITS_FILE}")
        examples[record["split"]] = chosen
    return Splits(examples["train"], examples["validation"], examples["test"], records)
