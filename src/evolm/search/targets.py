"""Training targets sampled from the base model itself (rejection sampling).

Reference answers that hold only the result (the ES paper's gsm8k file: "The answer is 42.") teach
a model to stop reasoning, and a small model then scores below its own base. Sampling the base
model a few times per question and keeping the answers the task scores correct gives targets in
the model's own words, with the reasoning that led to a right result. They are sampled once, when a
run starts, and kept in the run folder: a resumed run and every worker of it train on the same ones.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from evolm.engine import PopulationEngine
from evolm.engine.decoding import SamplingParams
from evolm.search.config import TrainingConfig
from evolm.tasks import Example, Task, TaskError

TARGETS_FILE = "self_targets.jsonl"
log = logging.getLogger("evolm.search")


def correct_samples(engine: PopulationEngine, task: Task, examples: list[Example], prompts: list[list[int]],
                    samples: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
    """For each example, its distinct sampled answers (base model, no adapter) that the task scores
    correct, in sampling order; all samples of all examples run as one batched generation."""
    engine.clear_factors()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_strings=task.stop_strings, seed=seed)
    texts = engine.generate(prompts * samples, None, params).texts[0]
    kept: list[list[str]] = [[] for _ in examples]
    for row, text in enumerate(texts):
        i = row % len(examples)
        if text not in kept[i] and task.checked_score(text, examples[i], i).correct:
            kept[i].append(text)
    return kept


def self_targets(run_dir: Path, engine: PopulationEngine, task: Task, splits: dict[str, list[Example]],
                 prompts: dict[str, list[list[int]]], config: TrainingConfig, max_new_tokens: int,
                 seed: int) -> dict[str, list[list[str]]]:
    """The run's self-sampled targets per split ({split: [answers per example]}): read from the run
    folder, or sampled and written there by the first worker to get there (the others read its file)."""
    path = run_dir / TARGETS_FILE
    if not path.exists():
        names = [(split, i) for split, examples in splits.items() for i in range(len(examples))]
        found = correct_samples(engine, task, [splits[split][i] for split, i in names],
                                [prompts[split][i] for split, i in names], config.self_samples,
                                config.self_temperature, max_new_tokens, seed)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(json.dumps({"split": split, "index": i, "answers": answers}) + "\n"
                                     for (split, i), answers in zip(names, found, strict=True)))
        try:
            os.link(temporary, path)  # fails if another worker got there first: then its file counts
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    targets = read_targets(path)
    for line in describe(targets):
        log.info("self targets, %s", line)
    if not any(targets["train"]):
        raise TaskError(f"training.targets=self: none of {config.self_samples} sampled answers to any of the "
                        f"{len(targets['train'])} training questions was correct; raise training.self_samples "
                        "or training.self_temperature, or use training.targets=reference")
    return targets


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
