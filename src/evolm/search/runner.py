"""`evolm search`: open or create a run folder, then work through its variants until the run is done.

Any number of processes may run the same folder at once (`--resume RUN_DIR`, one per GPU): each
claims pending variants from the database, and whoever finds a generation complete breeds the next.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Literal

import torch

from evolm.config import ConfigError, apply_overrides, dump_config, load_config, read_source, validate
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
from evolm.search.config import SearchRunConfig, apply_mode
from evolm.search.data import encode
from evolm.search.evolution import Member, Plan, generation_rng, initial_population, next_generation
from evolm.search.fitness import GreedyAnswers, score_variant
from evolm.search.outputs import best_variant, export_best, score_best_on_sets, write_history
from evolm.search.store import Store, Variant, open_search_run, worker_name
from evolm.search.targets import self_targets
from evolm.search.training import attach, check_target_modules, inherit, save_adapter, train
from evolm.tasks import Example, Task, load_task
from evolm.tasks.splits import load_eval_sets, load_splits

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
    train_examples, test_examples = load_splits(task, config.task, hold_out=True,
                                                needs_references=config.training.targets == "reference")
    eval_sets = load_eval_sets(task, config.task, config.eval.sets)
    check_model(config.model)
    if resume is None:
        run = RunDir.create(config.output_dir, overwrite)
        atomic_write_text(run.config_file, dump_config(config))
    with run.lock(shared=True), log_to_file(run.logs / "search.log", echo=True):  # workers share a run
        store = Store(run.database)
        try:
            Worker(config, run, store, task, train_examples, test_examples).run()
            write_history(store, run)
            best = export_best(store, run, config.evolution.generations)
            if best is not None and store.finished(config.evolution.generations):
                log.info("run complete: best variant %d (fitness %.4f) exported to %s", best.id, best.fitness,
                         run.best_adapter_dir)
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

    def __init__(self, config: SearchRunConfig, run: RunDir, store: Store, task: Task,
                 train_examples: list[Example], test_examples: list[Example]):
        self.config, self.run_dir, self.store, self.task = config, run, store, task
        self.train_examples, self.test_examples = train_examples, test_examples
        self.name = worker_name()
        self.loaded: LoadedModel | None = None
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
            elif self.store.finished(evolution.generations):
                return
            else:  # other workers hold the rest of this generation
                time.sleep(self.config.workers.poll_s)

    def breed(self, generation: int, everything: list[Variant]) -> list[Plan]:
        space, evolution = self.config.space, self.config.evolution
        rng = generation_rng(self.config.seed, generation)
        if generation >= evolution.generations:
            return []
        if generation == 0:
            return initial_population(space, evolution.population, rng)
        previous = [Member(v.id, v.genes, v.fitness) for v in everything if v.generation == generation - 1]
        seen = {v.genes.key() for v in everything}
        return next_generation(previous, evolution, space, rng, seen)

    def _load(self) -> LoadedModel:
        """The base model, tokenizer and encoded data, on first use (a finished run needs none)."""
        if self.loaded is None:
            self.loaded = load_model(self.config.model)
            check_target_modules(self.loaded.model, self.config.space)
            tokenizer, max_length = self.loaded.tokenizer, self.config.training.max_length
            self.test_prompts = [render(tokenizer, ex)[-max_length:] for ex in self.test_examples]
            modules = sorted({m for names in self.config.space.target_modules.values() for m in names})
            self.answer = GreedyAnswers(self.config.model, tokenizer, modules,
                                        eos_token_ids(self.loaded.model, tokenizer), self.config.fitness.batch_size)
            train_pairs, test_pairs = self._targets()
            self.train_rows = encode(tokenizer, train_pairs, max_length, tokenizer.eos_token_id)
            self.test_rows = encode(tokenizer, test_pairs, max_length, None)
        return self.loaded

    def _targets(self) -> tuple[list[tuple[Example, str]], list[tuple[Example, str]]]:
        """(example, answer) pairs to train on and to measure answer perplexity on: the task's reference
        answers, or with targets=self every distinct correct sampled answer for training and the first
        one for perplexity (evaluation questions without one count for accuracy only)."""
        if self.config.training.targets == "reference":
            return ([(ex, self.task.answer_text(ex)) for ex in self.train_examples],
                    [(ex, self.task.answer_text(ex)) for ex in self.test_examples])
        tokenizer, max_length = self.loaded.tokenizer, self.config.training.max_length
        splits = {"train": self.train_examples, "test": self.test_examples}
        prompts = {"train": [render(tokenizer, ex)[-max_length:] for ex in self.train_examples],
                   "test": self.test_prompts}
        found = self_targets(self.run_dir.root, self.answer.engine, self.task, splits, prompts, self.config.training,
                             self.config.fitness.max_new_tokens, self.config.seed)
        return ([(ex, answer) for ex, answers in zip(self.train_examples, found["train"]) for answer in answers],
                [(ex, answers[0]) for ex, answers in zip(self.test_examples, found["test"]) if answers])

    def process(self, variant: Variant) -> None:
        """Train and score a claimed variant; on any error or Ctrl-C the claim goes back to the queue."""
        try:
            metrics, folder = self._train_and_score(variant)
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

    def _train_and_score(self, variant: Variant) -> tuple[dict, Path]:
        loaded = self._load()
        config = self.config
        seed = (config.seed * 1_000_003 + variant.id) % 2**31  # its own stream: a retry retrains it identically
        torch.manual_seed(seed)
        model = attach(loaded.model, variant.genes, config.space)
        last_beat = [time.time()]

        def heartbeat() -> None:
            if time.time() - last_beat[0] > 10:
                self.store.beat(variant.id, self.name)
                last_beat[0] = time.time()

        try:
            inherited = 0
            if variant.init_from is not None:
                donor = self.store.get(variant.init_from)
                inherited = inherit(model, self.run_dir.root / donor.adapter, donor.genes, variant.genes)
            start = time.time()
            stats = train(model, self.train_rows, variant.genes, config.training, seed=seed,
                          pad_id=loaded.tokenizer.pad_token_id, device=loaded.device, heartbeat=heartbeat)
            folder = Path("variants") / str(variant.id) / "adapter"
            save_adapter(model, self.run_dir.root / folder)
            trained = time.time()
            heartbeat()
            metrics, samples = score_variant(model, variant.genes, self.answer, self.task, self.test_examples,
                                             self.test_prompts, self.test_rows, config.fitness, config.training,
                                             loaded.tokenizer.pad_token_id)
        finally:
            loaded.model = model.unload()
        atomic_write_text(self.run_dir.root / folder.parent / "completions.jsonl",
                          "".join(json.dumps(s) + "\n" for s in samples))
        metrics.update(stats, inherited_tensors=inherited, train_s=trained - start, eval_s=time.time() - trained)
        return metrics, folder

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
