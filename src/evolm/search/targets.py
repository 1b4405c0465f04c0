"""Training targets sampled from the base model itself (rejection sampling).

Reference answers that hold only the result (the ES paper's gsm8k file: "The answer is 42.") teach
a model to stop reasoning, and a small model then scores below its own base. Sampling the base
model a few times per question and keeping the answers the task scores correct gives targets in
the model's own words, with the reasoning that led to a right result. They are sampled when a run starts,
and with training.refresh_targets_every = k again every k generations from the best variant so far
(iterated rejection sampling), each time into a file of the run folder: a resumed run and every worker
of it train on the same ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evolm.adapters import Adapter, set_members
from evolm.engine import PopulationEngine
from evolm.engine.sampling import SamplingParams
from evolm.search.config import TrainingConfig
from evolm.search.splits import write_once
from evolm.tasks import Example, Task, TaskError

TARGETS_FILE = "self_targets.jsonl"
REFRESHED_FILE = "self_targets_gen{generation}.jsonl"
log = logging.getLogger("evolm.search")


def targets_file(generation: int) -> str:
    """The base model's targets (generation 0), or those refreshed for `generation` from the best variant."""
    return TARGETS_FILE if generation == 0 else REFRESHED_FILE.format(generation=generation)


def correct_samples(engine: PopulationEngine, adapter: Adapter | None, task: Task, examples: list[Example],
                    prompts: list[list[int]], samples: int, temperature: float, max_new_tokens: int,
                    seed: int) -> list[list[str]]:
    """For each example, its distinct sampled answers (of the base model, or with `adapter`) that the task
    scores correct, in sampling order; all samples of all examples run as one batched generation."""
    if adapter is None:
        engine.clear_factors()
    else:
        set_members(engine, [adapter])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_strings=task.stop_strings, seed=seed)
    texts = engine.generate(prompts * samples, None if adapter is None else [0], params).texts[0]
    kept: list[list[str]] = [[] for _ in examples]
    for row, text in enumerate(texts):
        i = row % len(examples)
        if text not in kept[i] and task.checked_score(text, examples[i], i).correct:
            kept[i].append(text)
    return kept


def self_targets(run_dir: Path, engine: PopulationEngine, task: Task, splits: dict[str, list[Example]],
                 prompts: dict[str, list[list[int]]], config: TrainingConfig, max_new_tokens: int,
                 seed: int) -> dict[str, list[list[str]]]:
    """The run's base-model targets per split ({split: [answers per example]}): read from the run folder,
    or sampled and written there by the first worker to get there (the others read its file)."""
    path = run_dir / TARGETS_FILE
    if not path.exists():
        names = [(split, i) for split, examples in splits.items() for i in range(len(examples))]
        found = correct_samples(engine, None, task, [splits[split][i] for split, i in names],
                                [prompts[split][i] for split, i in names], config.self_samples,
                                config.self_temperature, max_new_tokens, seed)
        write_once(path, _lines(_by_split(names, found)))
    targets = read_targets(path)
    for line in describe(targets):
        log.info("self targets, %s", line)
    if not any(targets["train"]):
        raise TaskError(f"training.targets=self: none of {config.self_samples} sampled answers to any of the "
                        f"{len(targets['train'])} training questions was correct; raise training.self_samples "
                        "or training.self_temperature, or use training.targets=reference")
    return targets


def refreshed_targets(run_dir: Path, generation: int, engine: PopulationEngine, best: Adapter, task: Task,
                      examples: list[Example], prompts: list[list[int]], previous: list[list[str]],
                      config: TrainingConfig, max_new_tokens: int, seed: int) -> list[list[str]]:
    """Training targets for `generation` on: the best variant's distinct correct sampled answers, and the
    previous targets for questions where it found none (no question loses the targets it had). Written once
    to the run folder, so a resumed run and other workers read them instead of sampling again."""
    path = run_dir / targets_file(generation)
    if not path.exists():
        found = correct_samples(engine, best, task, examples, prompts, config.self_samples, config.self_temperature,
                                max_new_tokens, seed + generation)
        fresh = sum(bool(answers) for answers in found)
        merged = [answers or earlier for answers, earlier in zip(found, previous, strict=True)]
        if write_once(path, _lines({"train": merged})):
            log.info("self targets refreshed for generation %d: the best variant answered %d of %d training "
                     "questions right", generation, fresh, len(examples))
    return read_targets(path)["train"]


def _by_split(names: list[tuple[str, int]], found: list[list[str]]) -> dict[str, list[list[str]]]:
    grouped: dict[str, list[list[str]]] = {}
    for (split, _), answers in zip(names, found, strict=True):
        grouped.setdefault(split, []).append(answers)
    return grouped


def _lines(targets: dict[str, list[list[str]]]) -> str:
    return "".join(json.dumps({"split": split, "index": i, "answers": answers}) + "\n"
                   for split, rows in targets.items() for i, answers in enumerate(rows))


def read_targets(path: Path) -> dict[str, list[list[str]]]:
    """{split: [correct answers of each question, in question order]} from a run's targets file."""
    found: dict[str, dict[int, list[str]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        found.setdefault(row["split"], {})[row["index"]] = row["answers"]
    return {split: [rows[i] for i in range(len(rows))] for split, rows in found.items()}


def describe(targets: dict[str, list[list[str]]]) -> list[str]:
    return [f"{split} split: {sum(bool(r) for r in rows)} of {len(rows)} questions have a correct sampled answer "
            f"({sum(map(len, rows))} answers)" for split, rows in targets.items()]
