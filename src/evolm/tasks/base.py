"""What a task is: examples to prompt with, and a reward for a completion."""

from __future__ import annotations

import json
import math
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evolm.errors import UserError

Split = Literal["train", "test"]
Messages = list[dict[str, str]]


class TaskError(UserError, ValueError):
    """A task or its data is unusable; the message names the task, file or example."""


@dataclass
class Example:
    """One prompt and what its completions are scored against."""

    prompt: str | Messages  # raw text, or chat messages rendered through the tokenizer's template
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool | None = None  # None where the task has no notion of a right answer


class Task(ABC):
    """A task loads its splits and scores completions (never the prompt)."""

    name: str = "task"
    description: str = ""  # one line for `evolm datasets`
    hub_dataset: str | None = None  # the task's Hugging Face dataset id, if it has one
    builtin_data: str | None = None  # what load_split(split, None) gives without a download, in words
    stop_strings: tuple[str, ...] = ()

    @abstractmethod
    def load_split(self, split: Split, source: str | None) -> list[Example]:
        """Examples of a split; `source` is None for the task's built-in data."""

    @abstractmethod
    def score(self, completion: str, example: Example) -> Score: ...

    def extra_metrics(self, scores: list[Score]) -> dict[str, float]:
        """Task-specific summary metrics of a set of scores, reported beside mean reward and accuracy."""
        return {}

    def checked_score(self, completion: str, example: Example, index: int) -> Score:
        """score() with errors and NaN turned into a message naming the task and the example."""
        try:
            result = self.score(completion, example)
        except Exception as exc:  # a user's reward function may raise anything
            raise TaskError(f"task '{self.name}': scoring example {index} raised {exc!r}") from exc
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            result = Score(float(result))
        if not isinstance(result, Score) or not isinstance(result.reward, (int, float)):
            got = result.reward if isinstance(result, Score) else result
            raise TaskError(f"task '{self.name}': score() must return a Score or a number, but for example {index} "
                            f"it returned {type(got).__name__} {got!r:.60}")
        if not math.isfinite(result.reward):
            raise TaskError(f"task '{self.name}': reward for example {index} is {result.reward}")
        return result


_SLICE = re.compile(r"^(?P<path>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_slice(source: str) -> tuple[str, slice]:
    """'data.json[:200]' -> ('data.json', slice(None, 200)); no suffix -> the whole file."""
    m = _SLICE.match(source)
    if not m:
        return source, slice(None)
    to_int = lambda s: int(s) if s else None  # noqa: E731
    return m["path"], slice(to_int(m["start"]), to_int(m["stop"]))


def load_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a local JSON / JSONL file, a `datasets` folder, or a hub dataset id.

    Any source may end in a Python slice, e.g. `countdown.json[:200]` or `countdown.json[-2000:]`.
    """
    location, part = split_slice(source)
    path = Path(location).expanduser()
    if path.is_dir():
        records = _read_saved_dataset(path, split)
    elif path.exists():  # a file, or a named pipe (bash's <(zcat data.jsonl.gz))
        records = _read_file(path)
    elif location.startswith(("/", ".", "~")) or location.endswith((".json", ".jsonl")):
        raise TaskError(f"data file not found: {path}")
    else:
        records = _read_hub_dataset(location, split)
    return records[part]


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".jsonl":
        data = [_parse_json(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        data = _parse_json(text, str(path))
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TaskError(f"{path}: expected a list of records or a mapping holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a list of records")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise TaskError(
                f"{path}: expected records (JSON objects such as {{\"question\": ..., \"answer\": ...}}), "
                f"but item {index} is {_json_kind(record)}"
            )
    return data


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{where}: not valid JSON: {exc}") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits(); its advice is for programmers
        raise TaskError(f"{where}: a number has more than {sys.get_int_max_str_digits()} digits") from None


def _json_kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), "null" if value is None else type(value).__name__)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise TaskError("reading a dataset folder or hub id needs the datasets extra: pip install 'evolm[datasets]'") from None
    return datasets


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    ds = _datasets().load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict
        names = list(ds.keys())
        ds = ds[split] if split in ds else ds[names[0]]
    return [dict(row) for row in ds]


def _read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    try:
        ds = _datasets().load_dataset(name, split=split)
    except Exception as exc:
        raise TaskError(f"could not load dataset '{name}' (split {split}) from the hub or a local path: {exc}") from exc
    return [dict(row) for row in ds]
