"""Task registry: built-in tasks by name, custom tasks by 'package.module:Class'."""

from __future__ import annotations

import importlib
from typing import Any

from evolm.tasks.base import Example, Score, Task, TaskError, load_records

BUILTIN: dict[str, str] = {
    "countdown": "evolm.tasks.countdown:CountdownTask",
    "conciseness": "evolm.tasks.conciseness:ConcisenessTask",
    "gsm8k": "evolm.tasks.qa:GSM8KTask",
    "math": "evolm.tasks.math:MathTask",
    "gsm8k-boxed": "evolm.tasks.math:GSM8KBoxedTask",
    "mmlu-pro": "evolm.tasks.qa:MMLUProTask",
    "squad": "evolm.tasks.qa:SquadTask",
    "alpaca": "evolm.tasks.qa:AlpacaTask",
    "dolly": "evolm.tasks.qa:DollyTask",
}


def _import(target: str) -> type[Task]:
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"cannot import task class '{target}': {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"'{target}' is not a subclass of evolm.tasks.Task")
    return cls


def task_class(name: str) -> type[Task]:
    if name in BUILTIN:
        return _import(BUILTIN[name])
    if ":" in name:
        return _import(name)
    raise TaskError(f"unknown task '{name}'; built-in: {', '.join(BUILTIN)}; or give 'package.module:Class'")


def load_task(name: str, options: dict[str, Any] | None = None) -> Task:
    cls = task_class(name)
    try:
        return cls(**(options or {}))
    except TaskError:
        raise
    except TypeError as exc:
        raise TaskError(f"task '{name}': bad task.options: {exc}") from None
    except Exception as exc:  # a custom task's own __init__ may raise anything
        raise TaskError(f"task '{name}': creating it raised {type(exc).__name__}: {exc}") from exc


__all__ = ["BUILTIN", "Example", "Score", "Task", "TaskError", "load_records", "load_task", "task_class"]
