"""A run's training and evaluation examples, as `evolm es` and `evolm search` both load them."""

from __future__ import annotations

from dataclasses import dataclass

from evolm.config import TEST_SET, ConfigError, EngineRunConfig, EvalSetConfig, TaskConfig
from evolm.tasks import load_task
from evolm.tasks.base import Example, Task, TaskError


@dataclass
class EvalSet:
    """A named evaluation set: the task that prompts and scores it, and its examples."""

    name: str
    task: Task
    examples: list[Example]
    source: str | None = None  # where the examples came from (None: the task's built-in data), for reports


def load_splits(task: Task, config: TaskConfig) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples, each from its own source, cut to task.train_size / task.test_size.

    Either split empty is a TaskError: a run without test examples would report no base or final metric
    at all. (`evolm search` holds its validation and test rows out of one source: search/splits.py.)
    """
    train = task.load_split("train", config.train)
    test = task.load_split("test", config.test)
    train, test = train[: config.train_size], test[: config.test_size]
    if not train:
        raise TaskError(f"task '{config.name}': the training split is empty ({config.train or 'built-in'})")
    if not test:
        raise TaskError(f"task '{config.name}': the test split is empty ({config.test or 'built-in'}); give "
                        "task.test a source with examples")
    return train, test


def load_examples(config: EngineRunConfig) -> tuple[Task, list[Example], list[Example], list[EvalSet]]:
    """An `evolm es` or `evolm grpo` run's task, its training and test examples and its eval.sets, loaded
    before the model so that bad data stops the run at once."""
    task = load_task(config.task.name, config.task.options)
    train, test = load_splits(task, config.task)
    eval_sets = load_eval_sets(task, config.task, config.eval.sets)
    if config.eval.keep_best == TEST_SET and not test:
        raise ConfigError("eval.keep_best=test, but the run has no test examples (task.test)")
    return task, train, test, eval_sets


def check_subset_size(key: str, size: int | None, train: list[Example], advice: str) -> None:
    """A subset of the training prompts taken each step (`key`) cannot be larger than the training split: a larger
    value is likely a mistake, said before the model loads."""
    if size is not None and size > len(train):
        raise ConfigError(f"{key}={size}: the training split has {len(train)} prompts; {advice}")


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
        set_task = task
        if spec.task not in (None, config.name) or spec.options is not None:
            try:
                set_task = load_task(spec.task or config.name, spec.options)
            except ValueError as exc:
                raise TaskError(f"eval.sets.{name}: {_one_line(exc)}") from exc
        loaded.append(load_eval_set(name, set_task, spec.source, spec.size, f"eval.sets.{name}"))
    return loaded


def load_eval_set(name: str, task: Task, source: str | None, size: int | None, where: str,
                  split: str = "test") -> EvalSet:
    """One named set: `task`'s examples from `source` (None: its built-in `split` data), cut to `size`. A bad
    or empty source is a one-line TaskError that starts with `where` (the field or option that named it)."""
    try:
        examples = task.load_split(split, source)[:size]
    except (OSError, ValueError) as exc:  # TaskError, and what `datasets` raises
        raise TaskError(f"{where}: {_one_line(exc)}") from exc
    if not examples:
        raise TaskError(f"{where}: no examples in {source or f'the built-in {split} data'}")
    return EvalSet(name, task, examples, source)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
