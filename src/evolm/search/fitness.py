"""Scoring a trained variant: batched greedy answers for accuracy, and answer-token perplexity."""

from __future__ import annotations

import math

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evolm.adapters import Adapter, set_members
from evolm.config import ModelConfig
from evolm.engine import PopulationEngine
from evolm.engine.sampling import SamplingParams
from evolm.metrics import headline_metric
from evolm.models import load_model
from evolm.scoring import score_all, summarize
from evolm.search.config import FitnessConfig, TrainingConfig
from evolm.search.data import Encoded, answer_nll, collate
from evolm.search.training import autocast
from evolm.tasks import Example, Task


def fitness_value(accuracy: float, perplexity: float, config: FitnessConfig) -> float:
    return config.accuracy_weight * accuracy - config.perplexity_weight * perplexity


class GreedyAnswers:
    """Greedy answers of trained variants on evolm's population engine (batched rows, preallocated KV
    cache, finished rows dropped): a second copy of the base model whose target linears read the
    variants' adapters, so nothing is merged into weights or written to disk."""

    def __init__(self, config: ModelConfig, tokenizer: PreTrainedTokenizerBase, modules: list[str],
                 eos_ids: list[int], batch_rows: int):
        self.engine = PopulationEngine(load_model(config).model, tokenizer, modules, eos_token_ids=eos_ids,
                                       max_batch_rows=batch_rows)

    def __call__(self, model: PeftModel, prompts: list[list[int]], max_new_tokens: int,
                 stop: tuple[str, ...]) -> list[str]:
        return self.of_adapters([Adapter.of_peft_model(model)], prompts, max_new_tokens, stop)[0]

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


def score_variant(model: PeftModel, answer: GreedyAnswers, task: Task, examples: list[Example],
                  prompts: list[list[int]], answers: list[Encoded], config: FitnessConfig, training: TrainingConfig,
                  pad_id: int) -> tuple[dict[str, float | None], list[dict]]:
    """Metrics (accuracy where the task has right answers, mean reward, the task's own extras, answer
    perplexity, fitness) and the per-example completions. Tasks without right answers use their mean
    reward as accuracy. Perplexity batches are training-sized: their logits cost what a training step's do."""
    completions = answer(model, prompts, config.max_new_tokens, task.stop_strings)
    scores = score_all(task, examples, completions)
    metrics = summarize(scores, task)
    perplexity, nll = answer_perplexity(model, answers, training.batch_size, pad_id, training.mixed_precision)
    metrics.update(perplexity=perplexity, answer_nll=nll,
                   fitness=fitness_value(headline_metric(metrics)[1], perplexity, config))
    samples = [{"index": i, "completion": c, "reward": s.reward, "correct": s.correct}
               for i, (c, s) in enumerate(zip(completions, scores, strict=True))]
    return metrics, samples
