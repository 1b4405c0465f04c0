"""An ES run's life around its loop (the twin of search/runner.py): check everything that needs no model,
load data and model, create or continue the run folder, run the loop (loop.py), and later rebuild θ from
the run folder to evaluate or export it. Also what a --resume may not change."""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from evolm import distributed
from evolm.config import ConfigError, ESRunConfig, apply_overrides, load_config, read_source, validate
from evolm.es.loop import ESRun
from evolm.models import check_targets, load_model, release_memory
from evolm.runs import (
    RunDir,
    append_jsonl,
    changed_keys,
    flatten,
    is_under,
    log_to_file,
    refuse_busy_dir,
    refuse_foreign_export_dir,
    refuse_ignored_resume_arguments,
)
from evolm.scoring import check_prompts, render_all
from evolm.tasks import load_task
from evolm.tasks.splits import check_subset_size, load_examples

log = logging.getLogger("evolm")

# Changing these on --resume would make the checkpoint mean something else.
FROZEN_ON_RESUME = ("seed", "model.name_or_path", "space", "es.population", "es.antithetic", "es.optimizer",
                    "eval.keep_best")
# A full-weight run's checkpoint is its fitness log, replayed through tell() on resume and export: everything
# tell() reads must stay what it was, or the replay would rebuild other weights than the run had.
FROZEN_FOR_REPLAY = ("es.sigma", "es.learning_rate", "es.fitness", "es.weight_decay", "es.adam_betas")


def prepare_run(
    config_source: str | None, overrides: list[str], *, resume: str | None, overwrite: bool
) -> tuple[ESRunConfig, RunDir, dict[str, list]]:
    """Validate everything that can be checked without a model, and touch nothing: the config, the
    output folder (is it free?) or the resumed run (its checkpoint readable, its generations no fewer
    than it has done). Returns the config, the run folder and, on resume, what the overrides change
    ({key: [before, after]})."""
    if not resume:
        if config_source is None:
            raise ConfigError("give a config file or preset name, or --resume RUN_DIR")
        config = load_config(config_source, overrides, ESRunConfig)
        refuse_busy_dir(Path(config.output_dir), overwrite)
        return config, RunDir(Path(config.output_dir)), {}
    refuse_ignored_resume_arguments(config_source, overrides, overwrite)
    run = RunDir.open(resume)
    saved = validate(read_source(run.config_file), ESRunConfig)
    config = validate(apply_overrides(saved.model_dump(mode="json"), overrides), ESRunConfig)
    before, after = saved.model_dump(), config.model_dump()
    changed = changed_keys(before, after)
    policy = FROZEN_ON_RESUME + (FROZEN_FOR_REPLAY if config.space.kind != "lora" else ())
    frozen = [key for key in changed if is_under(key, policy)]
    if frozen:
        raise ConfigError(f"{', '.join(frozen)} cannot change on --resume (they define what the checkpoint "
                          f"means; frozen for a {config.space.kind} run: {', '.join(policy)})")
    state = run.load_checkpoint()
    done = state["strategy"]["generation"] if state else 0
    if config.es.generations < done:
        raise ConfigError(f"es.generations={config.es.generations}: this run has done {done} generations already; "
                          f"give es.generations={done} or more (a run does not shrink below what it has done)")
    config.output_dir = str(run.root)  # where the run is now, should it have been moved
    flat_before, flat_after = flatten(before), flatten(after)
    return config, run, {key: [flat_before.get(key), flat_after.get(key)] for key in changed}


def load_run(run_dir: str | Path, device: str | None = None, generation: int | None = None,
             model: str | None = None) -> ESRun:
    """A run as its checkpoint left it (θ rebuilt by replay where it is not stored), or with `generation` θ
    of that generation (the fitness log replayed up to it), ready to evaluate or export. `model` is the run's
    base model where it now lives (a run folder shared from another machine)."""
    run = RunDir.open(run_dir)
    config = validate(read_source(run.config_file), ESRunConfig)
    if device:
        config.model.device = device
    if model:
        config.model.name_or_path = model
    config.eval.kl = False
    task = load_task(config.task.name, config.task.options)
    loaded = load_model(config.model)
    es_run = ESRun(config, run, loaded, task, [], [])
    state = run.load_checkpoint()
    if state is not None and generation is not None:
        log_so_far = state["strategy"]["fitness_log"]
        if generation > len(log_so_far):
            raise ValueError(f"{run_dir}: generation {generation} is past the checkpoint's {len(log_so_far)}")
        state["strategy"] = {"fitness_log": log_so_far[:generation]}  # no θ stored: replayed
    if state is not None:
        es_run.strategy.load_state_dict(state["strategy"])
    return es_run


def export_run(run_dir: str | Path, out: str | Path, device: str | None = None, best: bool = False,
               model: str | None = None, generation: int | None = None) -> Path:
    """`evolm export RUN DIR [--best | --generation G]`: rebuild θ (the last, the best on eval.keep_best's
    set, or θ_G: e.g. where the run's training clock matched another run's) from the run's small checkpoint
    by replaying its fitness log, and write it as a model or adapter."""
    if best and generation is not None:
        raise ValueError("give --best or --generation, not both")
    if generation is not None and generation < 0:
        raise ValueError(f"--generation {generation}: a generation is 0 (the base) or more")
    refuse_foreign_export_dir(Path(out), RunDir.open(run_dir))
    if best:
        best_file = RunDir.open(run_dir).best_file
        if not best_file.is_file():
            raise ValueError(f"{run_dir} has no best θ recorded ({best_file.name} is absent: the run has no "
                             "eval.keep_best, or its set was not evaluated yet)")
        generation = json.loads(best_file.read_text())["generation"]
    return load_run(run_dir, device, generation, model).export(Path(out))


def run_es(config_source: str | None, overrides: list[str], *, resume: str | None = None,
           overwrite: bool = False) -> tuple[RunDir, dict]:
    """Validate, load data, then the model and the engine; only then create the run folder (replacing
    an old run with --overwrite) or record the resume; run; return the run folder and its summary. A
    run that cannot start, or a Ctrl-C before it starts, writes nothing."""
    process_rank, _ = distributed.world()
    config, run, changes = prepare_run(config_source, overrides, resume=resume, overwrite=overwrite)
    task, train, test, eval_sets = load_examples(config)
    check_subset_size("es.prompts_per_generation", config.es.prompts_per_generation, train,
                      f"pick at most {len(train)}, or leave it unset (null) to use every prompt each generation")
    config.model.device = distributed.local_device_name(config.model.device)
    torch.manual_seed(config.seed)
    loaded = load_model(config.model)
    check_targets(loaded.model, config.space.target_modules, "space.target_modules", config.space.layers)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    for what, examples in [("the training split", train), ("the test split", test),
                           *((f"evaluation set {s.name}", s.examples) for s in eval_sets)]:
        check_prompts(render_all(loaded.tokenizer, examples), examples, context, what)
    lock = ExitStack()
    if process_rank == 0:  # the first process creates the folder and holds it; the others wait for it
        if not resume:
            run = RunDir.create(run.root, overwrite)
        lock.enter_context(run.lock())
        if resume:
            append_jsonl(run.resumes_file, {"time": time.time(), "changed": changes})
    distributed.barrier()
    with lock, log_to_file(run.logs / "run.log" if process_rank == 0 else None):
        log.info("model %s on %s (%s); %d train / %d test examples%s", config.model.name_or_path, loaded.device,
                 loaded.dtype, len(train), len(test),
                 "".join(f", {len(s.examples)} in {s.name}" for s in eval_sets))
        if changes:
            log.info("resumed with changes: %s", ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items()))
        es_run = ESRun(config, run, loaded, task, train, test, eval_sets)
        summary = es_run.train_loop()
        best = summary.get("best")
        if config.export and best and best["generation"] != summary["generations"] and \
                not es_run.space.params_in_checkpoint:
            del es_run, loaded  # the replay loads the base model afresh: free this copy first
            release_memory()
            log.info("rebuilding the best θ (generation %d) by replaying the fitness log", best["generation"])
            export_run(run.root, run.best_export_dir(config.space.kind), config.model.device, best=True)
    return run, summary


