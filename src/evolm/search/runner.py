"""`evolm search`: open or create a run folder, then work through its variants until the run is done.

Any number of processes may run the same folder at once (`--resume RUN_DIR`, one per GPU): each
claims pending variants from the database, and whoever finds a generation complete breeds the next.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal

import torch

from evolm.adapters import Adapter
from evolm.config import ConfigError, apply_overrides, dump_config, load_config, read_source, validate
from evolm.metrics import headline_metric
from evolm.models import LoadedModel, check_model, eos_token_ids, load_model, release_memory
from evolm.runs import (
    RunDir,
    atomic_write_text,
    changed_keys,
    is_under,
    log_to_file,
    refuse_busy_dir,
    refuse_ignored_resume_arguments,
)
from evolm.scoring import render
from evolm.search.config import DEFAULT_LORA_MODULES, EvolutionConfig, SearchRunConfig, TrainingConfig, apply_mode
from evolm.search.data import Encoded, encode
from evolm.search.evolution import Member, Plan, generation_rng, initial_population, next_generation
from evolm.search.fitness import GreedyAnswers, score_variant
from evolm.search.genes import Genes
from evolm.search.holdout import (
    BASELINE_FILE,
    TEST_FILE,
    baseline_plan,
    lineage_steps,
    test_report,
    with_baseline_set,
)
from evolm.search.outputs import best_variant, export_best, score_best_on_sets, update_summary, write_history
from evolm.search.splits import Splits, plan_splits, record_splits, recorded_splits
from evolm.search.store import Store, Variant, open_search_run, worker_name
from evolm.search.targets import refreshed_targets, self_targets
from evolm.search.training import attach, check_target_modules, inherit, save_adapter, train
from evolm.tasks import Example, Task, load_task
from evolm.tasks.splits import load_eval_sets

PRESETS = "evolm.presets.search"
# what a resumed run may change; new eval.sets on a finished run score its best variant on them
RESUMABLE = ("model.device", "model.attn_implementation", "workers", "eval")
log = logging.getLogger("evolm.search")


def run_search(config_source: str | None, overrides: list[str], *, resume: str | None = None,
               overwrite: bool = False, mode: Literal["full", "quick", "pipeline"] = "full") -> Path:
    """Start a run (config file or preset + overrides), or continue / join one with `resume`; returns
    the run folder. Everything is validated, the data loaded and the model checked (path, hub, device)
    before the folder is touched, so a run that cannot start costs no old run (see RunDir.create)."""
    if resume is not None:
        refuse_ignored_resume_arguments(config_source, overrides, overwrite)
        run = open_search_run(resume)
        config = _resumed_config(run, overrides, mode)
    elif not config_source:
        raise ConfigError("give a config file or preset name, or --resume RUN_DIR")
    else:
        config = apply_mode(load_config(config_source, overrides, SearchRunConfig, presets=PRESETS), mode)
        refuse_busy_dir(Path(config.output_dir), overwrite)
    task = load_task(config.task.name, config.task.options)
    splits = recorded_splits(task, run.root) if resume is not None else plan_splits(task, config)
    eval_sets = load_eval_sets(task, config.task, config.eval.sets)
    check_model(config.model)
    if resume is None:
        run = RunDir.create(config.output_dir, overwrite)
        atomic_write_text(run.config_file, dump_config(config))
        record_splits(run.root, splits)
    with run.lock(shared=True), log_to_file(run.logs / "search.log", echo=True):  # workers share a run
        log.info("splits: %s", ", ".join(f"{r['split']} {len(r['rows'])} rows" for r in splits.records))
        store = Store(run.database)
        try:
            worker = Worker(config, run, store, task, splits)
            worker.run()
            write_history(store, run)
            generations = planned_generations(store.variants(), config.evolution)
            best = export_best(store, run, generations, generations < config.evolution.generations)
            if best is not None and store.finished(generations):
                log.info("run complete: best variant %d (fitness %.4f) exported to %s", best.id, best.fitness,
                         run.best_adapter_dir)
                worker.finish(best)
                del worker
                if eval_sets:
                    release_memory()  # the worker's models are gone; the scoring loads the base model once
                    score_best_on_sets(run, config, best, eval_sets)
        finally:
            store.close()
    return run.root


def _resumed_config(run: RunDir, overrides: list[str], mode: str) -> SearchRunConfig:
    """The saved config with `overrides` applied, when they only change how the run is worked on."""
    if mode != "full":
        raise ConfigError("--quick-test and --pipeline-test apply when a run starts, not on --resume")
    saved = read_source(run.config_file)
    wanted = apply_overrides(copy.deepcopy(saved), overrides)
    frozen = [key for key in changed_keys(saved, wanted) if not is_under(key, RESUMABLE)]
    if frozen:
        raise ConfigError(f"a resumed run keeps its configuration; cannot change {', '.join(frozen)} "
                          f"(only {', '.join(RESUMABLE)} may change)")
    return validate(wanted, SearchRunConfig)


class Worker:
    """One process's share of a run: claim a variant, train it, score it, record it; repeat."""

    def __init__(self, config: SearchRunConfig, run: RunDir, store: Store, task: Task, splits: Splits):
        self.config, self.run_dir, self.store, self.task, self.splits = config, run, store, task, splits
        self.space = with_baseline_set(config.space) if config.baseline != "none" else config.space
        self.name = worker_name()
        self.loaded: LoadedModel | None = None
        self.targets: dict[int, list[list[str]]] = {}  # training targets by the generation they start at
        self.train_rows: dict[int, list[Encoded]] = {}
        self.started = time.time()

    def run(self) -> None:
        evolution = self.config.evolution
        while True:
            for variant_id in self.store.requeue_stale(self.config.workers.stale_after_s):
                log.info("variant %d: its worker is gone; it goes back to the queue", variant_id)
            variant = self.store.claim(self.name)
            if variant is not None:
                self.process(variant)
                write_history(self.store, self.run_dir)
            elif self.store.add_generation(self.breed):
                log.info("generation %d of 0-%d bred", self.store.latest_generation(), evolution.generations - 1)
            elif self.store.finished(planned_generations(self.store.variants(), evolution)):
                return
            else:  # other workers hold the rest of this generation
                time.sleep(self.config.workers.poll_s)

    def breed(self, generation: int, everything: list[Variant]) -> list[Plan]:
        space, evolution = self.config.space, self.config.evolution
        rng = generation_rng(self.config.seed, generation)
        if generation >= planned_generations(everything, evolution):
            if generation < evolution.generations:
                log.info("evolution.max_seconds (%g s) spent: generation %d was the last", evolution.max_seconds,
                         generation - 1)
            return []
        if generation == 0:
            return initial_population(space, evolution.population, rng)
        previous = [Member(v.id, v.genes, v.fitness) for v in everything if v.generation == generation - 1]
        seen = {v.genes.key() for v in everything}
        return next_generation(previous, evolution, space, rng, seen)

    def _load(self) -> LoadedModel:
        """The base model, tokenizer and validation data, on first use (a finished run needs none)."""
        if self.loaded is None:
            self.loaded = load_model(self.config.model)
            check_target_modules(self.loaded.model, self.space)
            tokenizer = self.loaded.tokenizer
            self.validation_prompts = self._prompts(self.splits.validation)
            modules = sorted({m for names in self.space.target_modules.values() for m in names})
            self.answer = GreedyAnswers(self.config.model, tokenizer, modules,
                                        eos_token_ids(self.loaded.model, tokenizer), self.config.fitness.batch_size)
            train_pairs, validation_pairs = self._base_targets()
            self.train_rows[0] = self._encode(train_pairs, tokenizer.eos_token_id)
            self.validation_rows = self._encode(validation_pairs, None)
        return self.loaded

    def _prompts(self, examples: list[Example]) -> list[list[int]]:
        return [render(self.loaded.tokenizer, ex)[-self.config.training.max_length:] for ex in examples]

    def _encode(self, pairs: list[tuple[Example, str]], eos: int | None) -> list[Encoded]:
        return encode(self.loaded.tokenizer, pairs, self.config.training.max_length, eos)

    def _base_targets(self) -> tuple[list[tuple[Example, str]], list[tuple[Example, str]]]:
        """(example, answer) pairs to train on and to measure answer perplexity on: the task's reference
        answers, or with targets=self every distinct correct sampled answer for training and the first
        one for perplexity (validation questions without one count for accuracy only)."""
        train, validation = self.splits.train, self.splits.validation
        if self.config.training.targets == "reference":
            return ([(ex, self.task.answer_text(ex)) for ex in train],
                    [(ex, self.task.answer_text(ex)) for ex in validation])
        found = self_targets(self.run_dir.root, self.answer.engine, self.task,
                             {"train": train, "validation": validation},
                             {"train": self._prompts(train), "validation": self.validation_prompts},
                             self.config.training, self.config.fitness.max_new_tokens, self.config.seed)
        self.targets[0] = found["train"]
        return (_pairs(train, found["train"]),
                [(ex, answers[0]) for ex, answers in zip(validation, found["validation"]) if answers])

    def _rows_for(self, generation: int) -> list[Encoded]:
        """The encoded training rows of a generation: the base targets, or with
        training.refresh_targets_every = k those last refreshed at a multiple of k."""
        every = self.config.training.refresh_targets_every
        start = generation // every * every if every else 0
        if start not in self.train_rows:
            self.train_rows[start] = self._encode(_pairs(self.splits.train, self._refreshed(start)),
                                                  self.loaded.tokenizer.eos_token_id)
        return self.train_rows[start]

    def _refreshed(self, start: int) -> list[list[str]]:
        """Training targets from generation `start` (a multiple of k) on, sampled from the best variant of
        the generations before it; every variant of those is scored, since generation `start` exists."""
        if start not in self.targets:
            previous = self._refreshed(start - self.config.training.refresh_targets_every)
            best = best_variant([v for v in self.store.variants() if v.generation < start])
            log.info("generation %d: training targets resampled from variant %d", start, best.id)
            self.targets[start] = refreshed_targets(
                self.run_dir.root, start, self.answer.engine, Adapter.of_folder(self.run_dir.root / best.adapter),
                self.task, self.splits.train, self._prompts(self.splits.train), previous, self.config.training,
                self.config.fitness.max_new_tokens, self.config.seed)
        return self.targets[start]

    def process(self, variant: Variant) -> None:
        """Train and score a claimed variant; on any error or Ctrl-C the claim goes back to the queue."""
        try:
            self._load()
            seed = (self.config.seed * 1_000_003 + variant.id) % 2**31  # its own stream: a retry retrains it alike
            donor = self.store.get(variant.init_from) if variant.init_from is not None else None
            metrics, folder = self._train_and_score(
                variant.genes, seed, donor, Path("variants") / str(variant.id), self._rows_for(variant.generation),
                self.config.training, lambda: self.store.beat(variant.id, self.name))
        except BaseException as exc:
            self.store.release(variant.id, self.name)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                genes, training = variant.genes, self.config.training
                raise ConfigError(
                    f"variant {variant.id} (rank {genes.rank}, modules {genes.target_modules}, training.batch_size "
                    f"{training.batch_size}, training.max_length {training.max_length}) does not fit: {exc}\n"
                    "lower training.batch_size / fitness.batch_size / training.max_length or drop the largest "
                    "space.ranks, then continue with --resume") from exc
            raise
        if not self.store.finish(variant.id, self.name, metrics.pop("fitness"), metrics, str(folder)):
            log.warning("variant %d was handed to another worker meanwhile; this result is dropped", variant.id)
            return
        self._report(self.store.get(variant.id))

    def _train_and_score(self, genes: Genes, seed: int, donor: Variant | None, where: Path, rows: list[Encoded],
                         training: TrainingConfig, beat: Callable[[], None]) -> tuple[dict, Path]:
        """Train an adapter of `genes` (from the donor's weights where shapes allow) on `rows`, save it to
        where/adapter, score it on the validation split and write where/completions.jsonl."""
        loaded, config = self.loaded, self.config
        torch.manual_seed(seed)
        model = attach(loaded.model, genes, self.space)
        last_beat = [time.time()]

        def heartbeat() -> None:
            if time.time() - last_beat[0] > 10:
                beat()
                last_beat[0] = time.time()

        try:
            inherited = 0
            if donor is not None:
                inherited = inherit(model, self.run_dir.root / donor.adapter, donor.genes, genes)
            start = time.time()
            stats = train(model, rows, genes, training, seed=seed, pad_id=loaded.tokenizer.pad_token_id,
                          device=loaded.device, heartbeat=heartbeat)
            folder = where / "adapter"
            save_adapter(model, self.run_dir.root / folder)
            trained = time.time()
            heartbeat()
            metrics, samples = score_variant(model, self.answer, self.task, self.splits.validation,
                                             self.validation_prompts, self.validation_rows, config.fitness,
                                             config.training, loaded.tokenizer.pad_token_id)
        finally:
            loaded.model = model.unload()
        atomic_write_text(self.run_dir.root / where / "completions.jsonl",
                          "".join(json.dumps(s) + "\n" for s in samples))
        metrics.update(stats, inherited_tensors=inherited, train_s=trained - start, eval_s=time.time() - trained)
        return metrics, folder

    def finish(self, best: Variant) -> None:
        """Once per run, by whichever worker claims it: train the baseline (baseline: default-lora) and score
        the test split for the base model, the best variant and the baseline together (results/test.json)."""
        if _report_names(self.run_dir.results / TEST_FILE, best.id):
            return
        claim = self.store.claim_stage("final", self.name, self.config.workers.stale_after_s)
        if claim != "claimed":
            log.info("the test split is %s", "scored" if claim == "done" else "being scored by another worker")
            return
        try:
            self._load()
            beat = functools.partial(self.store.beat_stage, "final", self.name)
            baseline = self._baseline(best, beat) if self.config.baseline != "none" else None
            adapters = {"base": None, "best": Adapter.of_folder(self.run_dir.root / best.adapter)}
            if baseline is not None:
                adapters["default_lora"] = Adapter.of_folder(self.run_dir.root / baseline["adapter"])
            texts = self.answer.of_adapters(list(adapters.values()), self._prompts(self.splits.test),
                                            self.config.fitness.max_new_tokens, self.task.stop_strings)
            report = test_report(self.task, self.splits.test, dict(zip(adapters, texts, strict=True)))
            atomic_write_text(self.run_dir.results / TEST_FILE, json.dumps(
                {"variant": best.id, "baseline": baseline, **report}, indent=2, default=float) + "\n")
        except BaseException:
            self.store.end_stage("final", self.name, done=False)
            raise
        self.store.end_stage("final", self.name, done=True)
        update_summary(self.run_dir, best.id)
        metrics = report["metrics"]
        log.info("test split (%d rows): %s", report["examples"], "; ".join(
            f"{name} {'%s %.4f' % headline_metric(m)}" for name, m in metrics.items()))

    def _baseline(self, best: Variant, beat: Callable[[], None]) -> dict:
        """Train the default LoRA for the steps of the best variant's lineage (on the base targets) and score
        it on the validation split; results/baseline.json records it, so a retried stage does not retrain."""
        record_file = self.run_dir.results / BASELINE_FILE
        if _report_names(record_file, best.id):
            return json.loads(record_file.read_text())
        steps = lineage_steps(self.store.variants(), best)
        genes, training = baseline_plan(steps, len(self.train_rows[0]), self.config.training)
        log.info("baseline: default LoRA (rank 16, alpha 32, lr 2e-4, q_proj/v_proj) for %d steps, as the best "
                 "variant's lineage took", steps)
        seed = (self.config.seed * 1_000_003 - 1) % 2**31  # a stream no variant uses
        metrics, folder = self._train_and_score(genes, seed, None, Path("baseline"), self.train_rows[0], training,
                                                beat)
        record = {"variant": best.id, "lineage_steps": steps, "genes": genes.to_dict(),
                  "modules": DEFAULT_LORA_MODULES, "adapter": str(folder), "validation": metrics}
        atomic_write_text(record_file, json.dumps(record, indent=2, default=float) + "\n")
        return record

    def _report(self, v: Variant) -> None:
        lineage = "" if v.origin == "initial" else f" ({v.origin} of {'+'.join(map(str, v.parents))}" + (
            f": {', '.join(v.mutated)})" if v.mutated else ")")
        accuracy = v.metrics["accuracy"]
        everything = self.store.variants()
        done = [x for x in everything if x.state == "done"]
        best = best_variant(done)
        total = self.config.evolution.population * self.config.evolution.generations
        elapsed = (time.time() - self.started) / max(1, sum(x.worker == self.name for x in done))
        log.info("generation %d variant %d%s: fitness %.4f (accuracy %s, reward %.3f, perplexity %.2f, loss %.3f) "
                 "train %.0fs eval %.0fs | best %d %.4f | %d/%d scored, ~%.0f min left on this worker",
                 v.generation, v.id, lineage, v.fitness,
                 "n/a" if accuracy is None else f"{accuracy:.3f}", v.metrics["reward"], v.metrics["perplexity"],
                 v.metrics["train_loss"], v.metrics["train_s"], v.metrics["eval_s"], best.id, best.fitness,
                 len(done), total, elapsed * (total - len(done)) / 60)


def planned_generations(variants: list[Variant], evolution: EvolutionConfig) -> int:
    """The generations the run will have: evolution.generations, or, once the variants' seconds reach
    evolution.max_seconds with the latest generation complete, that generation's count."""
    if evolution.max_seconds is None or not variants:
        return evolution.generations
    latest = max(v.generation for v in variants)
    if any(v.state != "done" for v in variants if v.generation == latest):
        return evolution.generations
    spent = sum(v.metrics["train_s"] + v.metrics["eval_s"] for v in variants)
    return min(evolution.generations, latest + 1) if spent >= evolution.max_seconds else evolution.generations


def _pairs(examples: list[Example], targets: list[list[str]]) -> list[tuple[Example, str]]:
    return [(ex, answer) for ex, answers in zip(examples, targets, strict=True) for answer in answers]


def _report_names(path: Path, best_id: int) -> bool:
    """True when the results file at `path` exists and was written for this best variant."""
    return path.is_file() and json.loads(path.read_text()).get("variant") == best_id
