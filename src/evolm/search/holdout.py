"""The end of a run: the default-LoRA baseline, and the test split, scored once for the base model, the
best variant and the baseline together (one batched generation), with per-example sign tests."""

from __future__ import annotations

import math

from evolm.metrics import compare_scores, sign_test
from evolm.scoring import score_all, summarize
from evolm.search.config import DEFAULT_LORA, DEFAULT_LORA_MODULES, SearchSpace, TrainingConfig
from evolm.search.genes import Genes
from evolm.search.store import Variant
from evolm.tasks import Example, Task

TEST_FILE = "test.json"  # under results/
BASELINE_FILE = "baseline.json"  # under results/
BASELINE_SET = "default_lora"  # the baseline's module set, beside the space's own
MODELS = ("base", "best", "default_lora")
# (challenger, reference): the comparisons the report shows, where both were scored
PAIRS = (("best", "base"), ("default_lora", "base"), ("best", "default_lora"))


def lineage_steps(variants: list[Variant], best: Variant) -> int:
    """Optimizer steps behind the best variant's weights: its own, and those of each variant whose adapter
    tensors it started from (init_from), back to a variant that started fresh."""
    by_id = {v.id: v for v in variants}
    steps, current = 0, best
    while True:
        steps += current.metrics["steps"]
        if current.init_from is None or not current.metrics.get("inherited_tensors"):
            return steps
        current = by_id[current.init_from]


def with_baseline_set(space: SearchSpace) -> SearchSpace:
    """The space with the baseline's module set added, so that the baseline trains like any variant."""
    return space.model_copy(update={"target_modules": {**space.target_modules, BASELINE_SET: DEFAULT_LORA_MODULES}})


def baseline_plan(steps: int, rows: int, training: TrainingConfig) -> tuple[Genes, TrainingConfig]:
    """The default LoRA's genes, with enough epochs over `rows` training rows for `steps` optimizer steps,
    and the training settings that stop it there."""
    per_epoch = math.ceil(math.ceil(rows / training.batch_size) / training.gradient_accumulation)
    genes = Genes(**DEFAULT_LORA, target_modules=BASELINE_SET, epochs=math.ceil(steps / per_epoch))
    return genes, training.model_copy(update={"max_steps": steps})


def test_report(task: Task, examples: list[Example], texts: dict[str, list[str]]) -> dict:
    """Metrics of each model on the test split, the comparisons of PAIRS (improvements, regressions and the
    sign test), and every example's answers."""
    scores = {name: score_all(task, examples, answers) for name, answers in texts.items()}
    comparisons = {}
    for challenger, reference in PAIRS:
        if challenger in scores and reference in scores:
            counts = compare_scores(scores[reference], scores[challenger])
            comparisons[f"{challenger}_vs_{reference}"] = {**counts, "sign_test_p": sign_test(counts)}
    detail = [{"index": i, **{f"{name}{part}": value for name in scores
                              for part, value in (("", texts[name][i]), ("_reward", scores[name][i].reward),
                                                  ("_correct", scores[name][i].correct))}}
              for i in range(len(examples))]
    return {"examples": len(examples), "metrics": {name: summarize(s, task) for name, s in scores.items()},
            "comparisons": comparisons, "examples_detail": detail}
