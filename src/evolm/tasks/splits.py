"""A run's training and evaluation examples, as `evolm es` and `evolm search` both load them."""

from __future__ import annotations

from dataclasses import dataclass

from evolm.config import EvalSetConfig, TaskConfig
from evolm.tasks import load_task
from evolm.tasks.base import Example, Task, TaskError


@dataclass
class EvalSet:
    """A named evaluation set: the task that prompts and scores it, and its examples."""

    name: str
    task: Task
    examples: list[Example]


def load_splits(task: Task, config: TaskConfig, *, hold_out: bool,
                needs_references: bool = False) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples, cut to task.train_size / task.test_size.

    `hold_out`: the run cannot do without an evaluation split (search scores every variant on it),
    so with a local training source and no test source the last test_size records (default: a
    tenth, at most 200) are held out of training for it. Without `hold_out` each split comes from
    its own source. Either split empty is a TaskError: a run without test examples would report no
    base or final metric at all.
    `needs_references`: the run learns the task's reference answers, so the task must provide them.
    """
    if needs_references:
        check_references(task, config)
    train = task.load_split("train", config.train)
    if hold_out and config.test is None and config.train is not None:
        held_out = config.test_size or max(1, min(200, len(train) // 10))
        if held_out >= len(train):
            raise TaskError(f"{config.train}: {len(train)} records leave nothing to train on after holding out "
                            f"{held_out} for evaluation; set task.test or a smaller task.test_size")
        train, test = train[:-held_out], train[-held_out:]
    else:
        test = task.load_split("test", config.test)
    train, test = train[: config.train_size], test[: config.test_size]
    if not train:
        raise TaskError(f"task '{config.name}': the training split is empty ({config.train or 'built-in'})")
    if not test:
        raise TaskError(f"task '{config.name}': the test split is empty ({config.test or 'built-in'}); give "
                        "task.test a source with examples")
    return train, test


def check_references(task: Task, config: TaskConfig) -> None:
    """A run that learns the task's reference answers needs a task that gives them."""
    if not callable(getattr(task, "answer_text", None)):
        raise TaskError(f"task '{config.name}' has no reference answers (an answer_text(example) method), "
                        "which supervised fine-tuning on references needs; training.targets=self needs none")


def load_eval_sets(task: Task, config: TaskConfig, sets: dict[str, EvalSetConfig]) -> list[EvalSet]:
    """The configured evaluation sets, loaded up front so that a bad source stops the run before the model
    loads, with a one-line error naming the set. A set of the run's own task shares its task object."""
    loaded = []
    for name, spec in sets.items():
        try:
            set_task = task
            if spec.task not in (None, config.name) or spec.options is not None:
                set_task = load_task(spec.task or config.name, spec.options)
            examples = set_task.load_split("test", spec.source)[: spec.size]
        except (OSError, ValueError) as exc:  # TaskError, and what `datasets` raises
            raise TaskError(f"eval.sets.{name}: {_one_line(exc)}") from exc
        if not examples:
            raise TaskError(f"eval.sets.{name}: no examples in {spec.source or 'the built-in test data'}")
        loaded.append(EvalSet(name, set_task, examples))
    return loaded


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
