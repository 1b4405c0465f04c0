"""Scoring a PEFT LoRA adapter on a task, and comparing it with its base model in the same batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evolm.config import ModelConfig
from evolm.engine import PopulationEngine
from evolm.engine.decoding import SamplingParams
from evolm.es.lora_space import LoRASpace, read_peft_adapter
from evolm.models import eos_token_ids, load_model
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks import Score, load_task


@dataclass
class EvalOptions:
    task: str
    data: str | None = None  # None = the task's built-in test data
    split: str = "test"
    model: str | None = None  # None = the adapter's base_model_name_or_path
    limit: int | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.0
    samples: int = 1  # answers per example (sampled): reports pass@k, the share of examples with a right one
    device: str = "auto"
    dtype: str = "auto"
    task_options: dict | None = None


def adapter_space(adapter_config: dict, shapes: dict[str, tuple[int, int]]) -> LoRASpace:
    """The LoRA space of a PEFT adapter; variants evolm cannot apply exactly are refused, not approximated."""
    unsupported = [k for k in ("use_dora", "use_rslora") if adapter_config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if adapter_config.get(k)]
    if adapter_config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"only plain LoRA adapters can be evaluated (this one uses {unsupported or adapter_config.get('peft_type')})")
    return LoRASpace(shapes, int(adapter_config["r"]), float(adapter_config["lora_alpha"]))


def evaluate_adapter(adapter: Path, options: EvalOptions, compare: bool = False) -> dict:
    """Metrics of the adapter (and with `compare` of the base model too, with a per-example comparison)."""
    if options.samples > 1 and options.temperature <= 0:
        raise ValueError("several samples per example need a temperature above 0 (greedy answers are all alike)")
    adapter_config, weights = read_peft_adapter(adapter)
    task = load_task(options.task, options.task_options)
    examples = task.load_split(options.split, options.data)[: options.limit]
    base_name = options.model or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError("the adapter names no base model: pass --model")
    loaded = load_model(ModelConfig(name_or_path=base_name, device=options.device, dtype=options.dtype))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, list(weights),
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    space = adapter_space(adapter_config, engine.shapes())
    theta = space.flatten(weights)
    members = torch.stack([torch.zeros_like(theta), theta]) if compare else theta[None]  # zero adapter = base
    engine.set_adapters(space.unflatten(members), space.scale)
    params = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            stop_strings=task.stop_strings)
    k = options.samples
    out = engine.generate(render_all(loaded.tokenizer, examples) * k, list(range(len(members))), params)
    scores = [score_all(task, examples * k, texts) for texts in out.texts]  # row j: example j % len(examples)
    best = [best_of(member_scores, len(examples)) for member_scores in scores]

    def metrics(member: int) -> dict:
        found = summarize(scores[member], task)
        return found | ({f"pass_at_{k}": summarize(best[member])["accuracy"]} if k > 1 else {})

    report = {"adapter": str(adapter), "model": base_name, "task": options.task, "examples": len(examples),
              "samples": k, "adapter_metrics": metrics(-1)}
    if compare:
        report["base_metrics"] = metrics(0)
        report["comparison"] = compare_scores(best[0], best[1])
        report["examples_detail"] = [
            {"index": i % len(examples), "sample": i // len(examples), "base": base_text, "adapter": text,
             "base_reward": b.reward, "adapter_reward": a.reward, "base_correct": b.correct,
             "adapter_correct": a.correct}
            for i, (base_text, text, b, a) in enumerate(zip(out.texts[0], out.texts[1], scores[0], scores[1]))
        ]
    return report


def best_of(scores: list[Score], n_examples: int) -> list[Score]:
    """Per example, the best of its samples (rows i, i + n, i + 2n, …): the highest reward, and right if
    any sample is."""
    samples = [scores[i::n_examples] for i in range(n_examples)]
    return [Score(max(s.reward for s in group),
                  None if group[0].correct is None else any(s.correct for s in group)) for group in samples]


def compare_scores(base, adapted) -> dict[str, int]:
    """Per-example outcome counts: verdicts where the task gives them, else reward up / down / equal."""
    counts = {"improvements": 0, "regressions": 0, "both_right": 0, "both_wrong": 0, "unchanged": 0}
    for b, a in zip(base, adapted):
        if b.correct is not None and a.correct is not None:
            key = {(False, True): "improvements", (True, False): "regressions",
                   (True, True): "both_right", (False, False): "both_wrong"}[(b.correct, a.correct)]
        else:
            key = "improvements" if a.reward > b.reward else "regressions" if a.reward < b.reward else "unchanged"
        counts[key] += 1
    return counts
