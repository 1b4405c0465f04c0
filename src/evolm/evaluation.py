"""Scoring an adapter, an evolved model folder or a base model on a task, and comparing with the base per example."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from evolm.adapters import read_peft_adapter
from evolm.config import ModelConfig
from evolm.engine import PopulationEngine
from evolm.engine.decoding import SamplingParams
from evolm.es.lora_space import LoRASpace
from evolm.es.space import EXPORT_INFO
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
    stop: list[str] | None = None  # None = the task's own stop strings


def adapter_space(adapter_config: dict, shapes: dict[str, tuple[int, int]]) -> LoRASpace:
    """The LoRA space of a PEFT adapter; variants evolm cannot apply exactly are refused, not approximated."""
    unsupported = [k for k in ("use_dora", "use_rslora") if adapter_config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if adapter_config.get(k)]
    if adapter_config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"only plain LoRA adapters can be evaluated (this one uses {unsupported or adapter_config.get('peft_type')})")
    return LoRASpace(shapes, int(adapter_config["r"]), float(adapter_config["lora_alpha"]))


def evaluate_adapter(adapter: Path | None, options: EvalOptions, compare: bool = False) -> dict:
    """Metrics of an adapter folder, a model folder or a run folder (its exported result), or with None the
    base model alone; with `compare` the base model too, and a per-example comparison."""
    if options.samples > 1 and options.temperature <= 0:
        raise ValueError("several samples per example need a temperature above 0 (greedy answers are all alike)")
    task = load_task(options.task, options.task_options)
    examples = task.load_split(options.split, options.data)[: options.limit]
    if not examples:
        raise ValueError(f"no examples to evaluate ({options.data or 'the task built-in ' + options.split + ' data'})")
    k = options.samples
    prompts_of = lambda tokenizer: render_all(tokenizer, examples) * k  # noqa: E731
    params = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            stop_strings=task.stop_strings if options.stop is None else options.stop)
    kind = "base" if adapter is None else "adapter" if (Path(adapter) / "adapter_config.json").is_file() else "model"
    if kind == "adapter":
        texts, base_name = _adapter_texts(Path(adapter), options, prompts_of, params, compare)
    else:
        model_path = options.model if adapter is None else str(adapter)
        if model_path is None:
            raise ValueError("give --adapter PATH (adapter, model or run folder) or --model NAME_OR_PATH")
        base_name = options.model if adapter is not None else model_path
        if adapter is not None and options.model is None:
            base_name = _recorded_base(Path(adapter))
        texts = [] if not compare or kind == "base" else [_model_texts(base_name, options, prompts_of, params)]
        texts.append(_model_texts(model_path, options, prompts_of, params))
    scores = [score_all(task, examples * k, member_texts) for member_texts in texts]  # row j: example j % n
    best = [best_of(member_scores, len(examples)) for member_scores in scores]

    def metrics(member: int) -> dict:
        found = summarize(scores[member], task)
        return found | ({f"pass_at_{k}": summarize(best[member])["accuracy"]} if k > 1 else {})

    report = {"adapter": None if adapter is None else str(adapter), "kind": kind, "model": base_name,
              "task": options.task, "examples": len(examples), "samples": k, "adapter_metrics": metrics(-1),
              "max_new_tokens": options.max_new_tokens, "stop": list(params.stop_strings)}
    if compare and len(texts) == 2:
        report["base_metrics"] = metrics(0)
        report["comparison"] = compare_scores(best[0], best[1])
        report["sign_test_p"] = sign_test(report["comparison"])
        report["examples_detail"] = [
            {"index": i % len(examples), "sample": i // len(examples), "base": base_text, "adapter": text,
             "base_reward": b.reward, "adapter_reward": a.reward, "base_correct": b.correct,
             "adapter_correct": a.correct}
            for i, (base_text, text, b, a) in enumerate(zip(texts[0], texts[1], scores[0], scores[1]))
        ]
    return report


def _adapter_texts(adapter: Path, options: EvalOptions, prompts_of, params, compare: bool):
    """A zero adapter (the base) and the adapter as two members of one batched generation."""
    adapter_config, weights = read_peft_adapter(adapter)
    base_name = options.model or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError("the adapter names no base model: pass --model")
    loaded = load_model(ModelConfig(name_or_path=base_name, device=options.device, dtype=options.dtype))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, list(weights),
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    space = adapter_space(adapter_config, engine.shapes())
    theta = space.params_of(weights)
    members = {n: torch.stack([torch.zeros_like(t), t]) if compare else t[None] for n, t in theta.items()}
    engine.set_adapters(space.unflatten(members), space.scale)
    members = list(range(2 if compare else 1))
    prompts = prompts_of(loaded.tokenizer)
    with rows_progress(len(members) * len(prompts), "base and adapter" if compare else "adapter") as bar:
        out = engine.generate(prompts, members, params, on_wave=bar.update)
    return out.texts, base_name


def _model_texts(name_or_path: str, options: EvalOptions, prompts_of, params) -> list[str]:
    loaded = load_model(ModelConfig(name_or_path=name_or_path, device=options.device, dtype=options.dtype))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, (),
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    prompts = prompts_of(loaded.tokenizer)
    with rows_progress(len(prompts), name_or_path) as bar:
        texts = engine.generate(prompts, None, params, on_wave=bar.update).texts[0]
    del engine, loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts


def rows_progress(total: int, what: str) -> tqdm:
    """A progress bar on stderr over the completions to generate (it moves wave by wave)."""
    return tqdm(total=total, desc=f"generating ({what})", unit="answer", file=sys.stderr, dynamic_ncols=True)


def _recorded_base(model_dir: Path) -> str:
    info = model_dir / EXPORT_INFO
    if not info.is_file():
        raise ValueError(f"{model_dir} does not say what it was evolved from (no {EXPORT_INFO}): pass --model BASE")
    return json.loads(info.read_text())["base_model"]


def resolve_run_folder(path: Path, options: EvalOptions) -> tuple[Path, EvalOptions]:
    """A run folder stands for its exported result, scored with the run's own task and generation settings."""
    from evolm.runs import RunDir

    run = RunDir.open(path)
    saved = yaml.safe_load(run.config_file.read_text())
    kind = saved.get("space", {}).get("kind", "lora")
    target = run.export_dir(kind)
    if not target.is_dir():
        raise ValueError(f"{path} has no exported {'adapter' if kind == 'lora' else 'model'} yet: "
                         f"run `evolm export {path} {target}` first")
    generation = saved.get("generation", {})
    changes = {"max_new_tokens": generation.get("max_new_tokens", options.max_new_tokens),
               "stop": generation.get("stop"), "task_options": saved["task"].get("options") or None}
    return target, replace(options, **changes)


def sign_test(comparison: dict[str, int]) -> float | None:
    """Two-sided exact sign test of improvements against regressions (ties left out)."""
    up, down = comparison["improvements"], comparison["regressions"]
    n = up + down
    if n == 0:
        return None
    tail = sum(math.comb(n, i) for i in range(min(up, down) + 1)) / 2**n
    return min(1.0, 2 * tail)


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
