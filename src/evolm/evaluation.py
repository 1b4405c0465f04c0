"""Scoring an adapter, an evolved model folder or a base model on a task, and comparing with the base per example."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from evolm.adapters import Adapter, set_members
from evolm.config import OLD_DECODING_NAME, SET_NAME, ModelConfig, read_source
from evolm.engine import PopulationEngine
from evolm.engine.population import sequence_kl
from evolm.engine.sampling import SamplingParams
from evolm.metrics import best_of, compare_scores, sign_test
from evolm.models import eos_token_ids, load_model, release_memory
from evolm.runs import EXPORT_INFO, RunDir
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks import Task, load_task
from evolm.tasks.base import split_slice
from evolm.tasks.splits import EvalSet, load_eval_set


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
    kl: bool = False  # also KL(scored model ‖ base) along the scored model's completions, per set


@dataclass
class Answers:
    """One scored model's completions of one set (k per example: row j answers example j % n), with what they
    cost: the mean number of tokens generated per completion, and the wall seconds of the `generate` call
    that wrote them (one call for the base and an adapter generated together, so shared)."""

    texts: list[str]
    tokens: list[list[int]]  # the generated token ids of each completion
    generate_seconds: float

    @property
    def completion_tokens(self) -> float:
        return sum(map(len, self.tokens)) / len(self.tokens)


def evaluate_adapter(adapter: Path | None, options: EvalOptions, compare: bool = False,
                     sets: list[EvalSet] | None = None, against: Path | None = None) -> dict:
    """Metrics of an adapter folder, a model folder or a run folder (its exported result), or with None the
    base model alone; with `compare` the base model too, and a per-example comparison; with `against` (an
    adapter or model folder) that model instead of the base: its metrics are "against_metrics".

    `sets`: several named evaluation sets, scored with one model load; None = options.data alone. The report
    has each set's results under "sets"; with one set they are also at the top level, as before sets existed.
    """
    if options.samples > 1 and options.temperature <= 0:
        raise ValueError("several samples per example need a temperature above 0 (greedy answers are all alike)")
    if options.kl and adapter is None:
        raise ValueError("--kl measures a trained model against its base: give --adapter")
    if sets is None:
        sets = load_data_sets(options, {set_name(options.data): options.data})
    kind = model_kind(adapter)
    base_name, answers = _answers_of_sets(adapter, kind, options, sets, compare and against is None)
    if against is not None:  # the reference takes the base's place, first
        _, reference_answers = _answers_of_sets(against, model_kind(against), options, sets, False)
        answers = {name: reference_answers[name] + answers[name] for name in answers}
    reference = "base" if against is None else "against"
    reports = {s.name: _set_report(s, answers[s.name], options.samples, reference) for s in sets}
    if options.kl:
        scored = {name: set_answers[-1].tokens for name, set_answers in answers.items()}
        for name, kl in _kl_to_base(Path(adapter), kind, base_name, options, sets, scored).items():
            reports[name]["adapter_metrics"] |= kl
    stops = {tuple(_sampling(options, s.task).stop_strings) for s in sets}
    report = {"adapter": None if adapter is None else str(adapter), "kind": kind, "model": base_name,
              "task": options.task, "samples": options.samples, "max_new_tokens": options.max_new_tokens,
              "stop": list(next(iter(stops))) if len(stops) == 1 else None, "sets": reports,
              "against": None if against is None else str(against)}
    return report | (next(iter(reports.values())) if len(reports) == 1 else {})


def model_kind(path: Path | None) -> str:
    """base (no path), adapter (a PEFT folder) or model (a model folder)."""
    return "base" if path is None else "adapter" if (Path(path) / "adapter_config.json").is_file() else "model"


def set_name(source: str | None) -> str:
    """A set's name from its source: the file or folder name without extension and slice ('test' for None)."""
    if source is None:
        return "test"
    return Path(split_slice(source)[0].rstrip("/")).name.removesuffix(".jsonl").removesuffix(".json") or "data"


def named_sources(specs: list[str]) -> dict[str, str]:
    """`--data` values, each SOURCE or NAME=SOURCE, as {name: source}; a repeated name gets -2, -3, …"""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not (sep and SET_NAME.match(name)):
            name, source = set_name(spec), spec
        unique, n = name, 1
        while unique in named:
            n += 1
            unique = f"{name}-{n}"
        named[unique] = source
    return named


def load_data_sets(options: EvalOptions, sources: dict[str, str | None]) -> list[EvalSet]:
    """Examples of each named source for options.task, cut to options.limit; a bad source names its set."""
    task = load_task(options.task, options.task_options)
    return [load_eval_set(name, task, source, options.limit, f"--data {name}", options.split)
            for name, source in sources.items()]


def _sampling(options: EvalOptions, task: Task) -> SamplingParams:
    return SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                          stop_strings=task.stop_strings if options.stop is None else options.stop)


def _set_report(data: EvalSet, answers: list[Answers], k: int, reference: str = "base") -> dict:
    """One set's metrics per scored model (the last is the adapter), with the per-example comparison when
    a reference (the base, or the model compared against) was scored too, first; row j of each model's
    texts answers example j % n."""
    examples, task = data.examples, data.task
    texts = [member.texts for member in answers]
    scores = [score_all(task, examples * k, member_texts) for member_texts in texts]
    best = [best_of(member_scores, len(examples)) for member_scores in scores]

    def metrics(member: int) -> dict:
        found = summarize(scores[member], task)
        return (found | ({f"pass_at_{k}": summarize(best[member])["accuracy"]} if k > 1 else {})
                | {"completion_tokens": answers[member].completion_tokens,
                   "generate_seconds": answers[member].generate_seconds})

    # every answer of the scored model per example (`evolm compare` pairs saved reports), and the reference's
    detail = [{"index": i % len(examples), "sample": i // len(examples), "adapter": text, "adapter_reward": a.reward,
               "adapter_correct": a.correct} for i, (text, a) in enumerate(zip(texts[-1], scores[-1]))]
    report = {"examples": len(examples), "source": data.source, "adapter_metrics": metrics(-1),
              "examples_detail": detail}
    if len(answers) == 2:
        report[f"{reference}_metrics"] = metrics(0)
        report["comparison"] = compare_scores(best[0], best[1])
        report["sign_test_p"] = sign_test(report["comparison"])
        for row, text, b in zip(detail, texts[0], scores[0]):
            row |= {reference: text, f"{reference}_reward": b.reward, f"{reference}_correct": b.correct}
    return report


def _answers_of_sets(adapter: Path | None, kind: str, options: EvalOptions, sets: list[EvalSet],
                     compare: bool) -> tuple[str, dict[str, list[Answers]]]:
    """(base model name, {set: answers of each scored model, the base first when compared}); each model is
    loaded once for all sets."""
    if kind == "adapter":
        return _adapter_answers(Path(adapter), options, sets, compare)
    model_path = options.model if adapter is None else str(adapter)
    if model_path is None:
        raise ValueError("give --adapter PATH (adapter, model or run folder) or --model NAME_OR_PATH")
    base_name = options.model if adapter is not None else model_path
    if adapter is not None and options.model is None:
        base_name = _recorded_base(Path(adapter))
    models = ([base_name] if compare and kind != "base" else []) + [model_path]
    answers: dict[str, list[Answers]] = {s.name: [] for s in sets}
    for name_or_path in models:
        for name, model_answers in _model_answers(name_or_path, options, sets).items():
            answers[name].append(model_answers)
    return base_name, answers


def _adapter_answers(adapter: Path, options: EvalOptions, sets: list[EvalSet], compare: bool):
    """A zero adapter (the base) and the adapter as two members of one batched generation per set."""
    found = Adapter.of_folder(adapter)
    base_name = options.model or found.base_model
    if not base_name:
        raise ValueError("the adapter names no base model: pass --model")
    loaded = load_model(ModelConfig(name_or_path=base_name, device=options.device, dtype=options.dtype))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, list(found.factors),
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    set_members(engine, [None, found] if compare else [found])
    answers = _generate_sets(engine, loaded.tokenizer, sets, options, list(range(2 if compare else 1)),
                             "base and adapter" if compare else "adapter")
    del engine, loaded
    release_memory()
    return base_name, answers


def _model_answers(name_or_path: str, options: EvalOptions, sets: list[EvalSet]) -> dict[str, Answers]:
    loaded = load_model(ModelConfig(name_or_path=name_or_path, device=options.device, dtype=options.dtype))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, (),
                              eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer))
    answers = {name: a[0] for name, a in _generate_sets(engine, loaded.tokenizer, sets, options, None,
                                                         name_or_path).items()}
    del engine, loaded
    release_memory()
    return answers


def _generate_sets(engine: PopulationEngine, tokenizer, sets: list[EvalSet], options: EvalOptions,
                   members: list[int] | None, what: str) -> dict[str, list[Answers]]:
    """Each set's answers (one per member slot), timed set by set, with one progress bar over all of them."""
    prompts = {s.name: render_all(tokenizer, s.examples) * options.samples for s in sets}
    slots = len(members) if members else 1
    answers: dict[str, list[Answers]] = {}
    with rows_progress(slots * sum(map(len, prompts.values())), what) as bar:
        for s in sets:
            start = time.perf_counter()
            done = engine.generate(prompts[s.name], members, _sampling(options, s.task), on_rows=bar.update)
            seconds = time.perf_counter() - start
            answers[s.name] = [Answers(texts, tokens, seconds)
                               for texts, tokens in zip(done.texts, done.tokens)]
    return answers


def _kl_to_base(adapter: Path, kind: str, base_name: str, options: EvalOptions, sets: list[EvalSet],
                completions: dict[str, list[list[int]]]) -> dict[str, dict]:
    """Per set, KL(scored model ‖ base) along the scored model's own completions of the set's prompts: an
    adapter on the base with the adapter off as the reference, or a model folder beside the base."""
    from peft import PeftModel

    base = load_model(ModelConfig(name_or_path=base_name, device=options.device, dtype=options.dtype))
    if kind == "adapter":
        policy = PeftModel.from_pretrained(base.model, str(adapter)).eval()

        def reference_logits(ids):
            with policy.disable_adapter():
                return policy(input_ids=ids).logits
    else:
        policy = load_model(ModelConfig(name_or_path=str(adapter), device=options.device, dtype=options.dtype)).model

        def reference_logits(ids):
            return base.model(input_ids=ids).logits
    device = next(policy.parameters()).device
    kls = {s.name: sequence_kl(lambda ids: policy(input_ids=ids).logits, reference_logits,
                               render_all(base.tokenizer, s.examples) * options.samples, completions[s.name], device)
           for s in sets}
    policy = base = None  # the closures above share these cells: this frees both models before release_memory
    release_memory()
    return kls


def rows_progress(total: int, what: str) -> tqdm:
    """A progress bar on stderr over the completions to generate (it moves wave by wave)."""
    return tqdm(total=total, desc=f"generating ({what})", unit="answer", file=sys.stderr, dynamic_ncols=True)


def _recorded_base(model_dir: Path) -> str:
    info = model_dir / EXPORT_INFO
    if not info.is_file():
        raise ValueError(f"{model_dir} does not say what it was evolved from (no {EXPORT_INFO}): pass --model BASE")
    return json.loads(info.read_text())["base_model"]


def resolve_run_folder(path: Path, options: EvalOptions) -> tuple[Path, EvalOptions]:
    """A run folder stands for its exported result, scored with the run's own task and decoding settings."""
    run = RunDir.open(path)
    saved = read_source(run.config_file)
    kind = (saved.get("space") or saved.get("grpo", {}).get("space", {})).get("kind", "lora")  # es or grpo run
    target = run.export_dir(kind)
    if not target.is_dir():
        raise ValueError(f"{path} has no exported {'adapter' if kind == 'lora' else 'model'} yet: "
                         f"run `evolm export {path} {target}` first")
    decoding = saved.get("decoding", saved.get(OLD_DECODING_NAME, {}))  # a run of an evolm before the rename
    changes = {"max_new_tokens": decoding.get("max_new_tokens", options.max_new_tokens),
               "stop": decoding.get("stop"), "task_options": saved["task"].get("options") or None}
    return target, replace(options, **changes)
