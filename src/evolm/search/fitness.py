"""Scoring a trained variant: batched greedy answers for accuracy, and answer-token perplexity."""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evolm.prompts import score_all, summarize
from evolm.search.config import FitnessConfig, TrainingConfig
from evolm.search.data import Encoded, answer_nll, collate
from evolm.search.training import autocast
from evolm.tasks import Example, Task

# greedy without the penalties a model's generation_config may carry (Qwen's repetition_penalty, …)
PLAIN_GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def fitness_value(accuracy: float, perplexity: float, config: FitnessConfig) -> float:
    return config.accuracy_weight * accuracy - config.perplexity_weight * perplexity


@torch.inference_mode()
def greedy_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                       config: FitnessConfig, eos_ids: list[int], stop: tuple[str, ...], precision: str,
                       heartbeat: Callable[[], None]) -> list[str]:
    """Greedy completions, batch_size prompts per left-padded generate call (similar lengths together)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), config.batch_size):
        chunk = order[start: start + config.batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        with autocast(device, precision):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    max_new_tokens=config.max_new_tokens, eos_token_id=eos_ids,
                                    pad_token_id=tokenizer.pad_token_id, **PLAIN_GREEDY)
        for row, i in enumerate(chunk):
            texts[i] = _cut(tokenizer.decode(output[row, width:], skip_special_tokens=True), stop)
        heartbeat()
    return texts


def _cut(text: str, stop: tuple[str, ...]) -> str:
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


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


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, examples: list[Example],
             prompts: list[list[int]], answers: list[Encoded], config: FitnessConfig, training: TrainingConfig,
             eos_ids: list[int], heartbeat: Callable[[], None]) -> tuple[dict[str, float | None], list[dict]]:
    """Metrics (accuracy where the task has right answers, mean reward, answer perplexity, fitness) and
    the per-example completions. Tasks without right answers use their mean reward as accuracy.
    Perplexity batches are training-sized: their logits cost what a training step's do."""
    precision = training.mixed_precision
    completions = greedy_completions(model, tokenizer, prompts, config, eos_ids, task.stop_strings, precision,
                                     heartbeat)
    scores = score_all(task, examples, completions)
    summary = summarize(scores)
    accuracy, reward = summary["accuracy"], summary["reward"]
    perplexity, nll = answer_perplexity(model, answers, training.batch_size, tokenizer.pad_token_id, precision)
    metrics = {"accuracy": accuracy, "reward": reward, "perplexity": perplexity, "answer_nll": nll,
               "fitness": fitness_value(reward if accuracy is None else accuracy, perplexity, config)}
    samples = [{"index": i, "completion": c, "reward": s.reward, "correct": s.correct}
               for i, (c, s) in enumerate(zip(completions, scores, strict=True))]
    return metrics, samples
