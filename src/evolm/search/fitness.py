"""Scoring a trained variant: batched greedy answers for accuracy, and answer-token perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evolm.adapters import lora_factors, read_peft_adapter
from evolm.config import ModelConfig
from evolm.engine import LowRankWeights, PopulationEngine
from evolm.engine.decoding import SamplingParams
from evolm.models import load_model
from evolm.scoring import score_all, summarize
from evolm.search.config import FitnessConfig, TrainingConfig
from evolm.search.data import Encoded, answer_nll, collate
from evolm.search.genes import Genes
from evolm.search.training import autocast
from evolm.tasks import Example, Task


def fitness_value(accuracy: float, perplexity: float, config: FitnessConfig) -> float:
    return config.accuracy_weight * accuracy - config.perplexity_weight * perplexity


@dataclass(frozen=True)
class Adapter:
    """A trained LoRA as the engine reads it: {layer name: (A [r, in], B [out, r])} and its scale alpha / r."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float

    @classmethod
    def of_model(cls, model: PeftModel, genes: Genes) -> "Adapter":
        found = lora_factors(get_peft_model_state_dict(model))
        return cls({name: (f["A"], f["B"]) for name, f in found.items()}, genes.alpha / genes.rank)

    @classmethod
    def of_folder(cls, folder: Path) -> "Adapter":
        config, factors = read_peft_adapter(folder)
        return cls(factors, float(config["lora_alpha"]) / int(config["r"]))


def set_members(engine: PopulationEngine, adapters: list[Adapter | None]) -> None:
    """Make each adapter a population member of the engine (None: the base model). Ranks may differ: the
    factors are zero-padded to the largest rank and each scale folded into its B, which leaves every
    member's update B·A·scale unchanged; layers an adapter does not touch get zeros."""
    shapes = engine.shapes()
    for adapter in adapters:
        unknown = sorted(set(adapter.factors) - set(shapes)) if adapter is not None else []
        if unknown:
            raise ValueError(f"the adapter has layers the engine does not target, e.g. {unknown[:3]}")
    rank = max((a.shape[0] for adapter in adapters if adapter for a, _ in adapter.factors.values()), default=1)
    weights = {}
    for name, (fan_in, fan_out) in shapes.items():
        a_rows, b_rows = torch.zeros(len(adapters), rank, fan_in), torch.zeros(len(adapters), fan_out, rank)
        for member, adapter in enumerate(adapters):
            if adapter is not None and name in adapter.factors:
                a, b = adapter.factors[name]
                a_rows[member, : a.shape[0]] = a
                b_rows[member, :, : b.shape[1]] = b * adapter.scale
        weights[name] = LowRankWeights(a_rows, b_rows)
    engine.set_factors(weights, 1.0)


class GreedyAnswers:
    """Greedy answers of trained variants on evolm's population engine (batched rows, preallocated KV
    cache, finished rows dropped): a second copy of the base model whose target linears read the
    variants' adapters, so nothing is merged into weights or written to disk."""

    def __init__(self, config: ModelConfig, tokenizer: PreTrainedTokenizerBase, modules: list[str],
                 eos_ids: list[int], batch_rows: int):
        self.engine = PopulationEngine(load_model(config).model, tokenizer, modules, eos_token_ids=eos_ids,
                                       max_batch_rows=batch_rows)

    def __call__(self, model: PeftModel, genes: Genes, prompts: list[list[int]], max_new_tokens: int,
                 stop: tuple[str, ...]) -> list[str]:
        return self.of_adapters([Adapter.of_model(model, genes)], prompts, max_new_tokens, stop)[0]

    def of_adapters(self, adapters: list[Adapter | None], prompts: list[list[int]], max_new_tokens: int,
                    stop: tuple[str, ...]) -> list[list[str]]:
        """Each adapter's (None: the base model's) answers to every prompt, all in one batched generation."""
        set_members(self.engine, adapters)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=stop)
        return self.engine.generate(prompts, list(range(len(adapters))), params).texts


@torch.inference_mode()
def answer_perplexity(model: PreTrainedModel, rows: list[Encoded], batch_size: int, pad_id: int,
                      precision: str) -> tuple[float, float]:
    """(perplexity, mean NLL) over all reference-answer tokens of the evaluation split, token-weighted."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        with autocast(device, precision):
            nll, tokens = answer_nll(model, collate(rows[start: start + batch_size], pad_id, device))
        total += float(nll.sum())
        count += int(tokens.sum())
    mean = total / max(count, 1)
    return math.exp(min(mean, 700.0)), mean  # exp(700) is near float's limit: a hopeless model, not an overflow


def score_variant(model: PeftModel, genes: Genes, answer: GreedyAnswers, task: Task, examples: list[Example],
                  prompts: list[list[int]], answers: list[Encoded], config: FitnessConfig, training: TrainingConfig,
                  pad_id: int) -> tuple[dict[str, float | None], list[dict]]:
    """Metrics (accuracy where the task has right answers, mean reward, the task's own extras, answer
    perplexity, fitness) and the per-example completions. Tasks without right answers use their mean
    reward as accuracy. Perplexity batches are training-sized: their logits cost what a training step's do."""
    completions = answer(model, genes, prompts, config.max_new_tokens, task.stop_strings)
    scores = score_all(task, examples, completions)
    metrics = summarize(scores, task)
    perplexity, nll = answer_perplexity(model, answers, training.batch_size, pad_id, training.mixed_precision)
    accuracy = metrics["reward"] if metrics["accuracy"] is None else metrics["accuracy"]
    metrics.update(perplexity=perplexity, answer_nll=nll, fitness=fitness_value(accuracy, perplexity, config))
    samples = [{"index": i, "completion": c, "reward": s.reward, "correct": s.correct}
               for i, (c, s) in enumerate(zip(completions, scores, strict=True))]
    return metrics, samples
