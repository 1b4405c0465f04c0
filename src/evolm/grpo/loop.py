"""`evolm grpo`: TRL's GRPOTrainer on an evolm task, writing an evolm run folder.

What is TRL's and what is evolm's:
- TRL: the GRPO loss, advantages, KL, optimizer, scheduler, checkpoints (checkpoints/checkpoint-N) and resume.
- evolm: the task (its prompts are TRL's prompts, its score the reward), the sampler and the evaluation. A
  second copy of the model, wrapped by the population engine, holds θ as an ES run would (an `ESRun` with one
  member); each step θ is copied into it, and it samples the step's completions through TRL's `rollout_func`
  hook (with the task's stop strings, as `evolm es` samples) and scores θ greedily on the test split and
  eval.sets exactly as `evolm es` does. So both optimizers are measured by one sampler, one evaluation and
  one clock (training seconds without evaluation, sampled completions).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evolm import reports
from evolm.adapters import Adapter
from evolm.config import TEST_SET, ConfigError, ESRunConfig, SpaceConfig, apply_overrides, dump_config, validate
from evolm.engine.decoding import cut_at_stop
from evolm.es.loop import ESRun
from evolm.grpo.config import GRPORunConfig, load_grpo_config
from evolm.metrics import headline_metric
from evolm.models import LoadedModel, check_targets, load_model
from evolm.runs import (
    RunDir,
    append_jsonl,
    atomic_write_text,
    changed_keys,
    evaluations_summary,
    flatten,
    is_under,
    log_to_file,
    read_jsonl,
    refuse_busy_dir,
    refuse_ignored_resume_arguments,
    stop_signals_to,
    write_jsonl,
)
from evolm.scoring import render
from evolm.tasks import Example, Task
from evolm.tasks.splits import EvalSet, check_subset_size, load_examples
from evolm.tracking import Tracker, format_metrics

log = logging.getLogger("evolm")

STEP = "step"
# Changing these on --resume would make the checkpoint (or the data order TRL skips through) mean something else.
FROZEN_ON_RESUME = ("seed", "model.name_or_path", "grpo.space", "grpo.group_size", "grpo.prompts_per_step",
                    "grpo.gradient_accumulation_steps", "eval.keep_best")
CHECKPOINT_PREFIX = "checkpoint-"
SCORED = ("finished", "diverged")  # statuses whose last θ is a whole step's, scored at the end like a final one


def evaluation_config(config: GRPORunConfig) -> ESRunConfig:
    """The ES view of the run that evaluates (and samples from) θ: the same model, task, decoding and eval,
    in the space that holds what GRPO trains."""
    space = config.grpo.space
    return ESRunConfig(output_dir=config.output_dir, seed=config.seed, model=config.model, task=config.task,
                       space=SpaceConfig(kind=space.kind, rank=space.rank, alpha=space.alpha,
                                         target_modules=space.target_modules, layers=space.layers),
                       decoding=config.decoding, eval=config.eval, logging=config.logging)


def last_checkpoint(run: RunDir) -> Path | None:
    """The newest complete TRL checkpoint (trainer_state.json is the last file Trainer writes into one)."""
    root = run.checkpoints
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()
            and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def checkpoint_step(checkpoint: Path | None) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0


def prepare_run(config_source: str | None, overrides: list[str], *, resume: str | None,
                overwrite: bool) -> tuple[GRPORunConfig, RunDir, dict[str, list]]:
    """As `evolm es` does: validate all that needs no model, touch nothing; on resume the saved config
    with the overrides, refusing changes to what the checkpoint means."""
    if not resume:
        if config_source is None:
            raise ConfigError("give a config file or preset name, or --resume RUN_DIR")
        config = load_grpo_config(config_source, overrides)
        refuse_busy_dir(Path(config.output_dir), overwrite)
        return config, RunDir(Path(config.output_dir)), {}
    refuse_ignored_resume_arguments(config_source, overrides, overwrite)
    run = RunDir.open(resume)
    saved = load_grpo_config(str(run.config_file), [])
    config = validate(apply_overrides(saved.model_dump(mode="json"), overrides), GRPORunConfig)
    before, after = saved.model_dump(), config.model_dump()
    changed = changed_keys(before, after)
    frozen = [key for key in changed if is_under(key, FROZEN_ON_RESUME)]
    if frozen:
        raise ConfigError(f"{', '.join(frozen)} cannot change on --resume (frozen: {', '.join(FROZEN_ON_RESUME)})")
    done = checkpoint_step(last_checkpoint(run))
    if config.grpo.steps < done:
        raise ConfigError(f"grpo.steps={config.grpo.steps}: this run has done {done} steps already; give "
                          f"grpo.steps={done} or more")
    config.output_dir = str(run.root)
    flat_before, flat_after = flatten(before), flatten(after)
    return config, run, {key: [flat_before.get(key), flat_after.get(key)] for key in changed}


def stop_strings(config: GRPORunConfig, task: Task) -> tuple[str, ...]:
    """The stop strings rollouts end at: decoding.stop, else the task's own (as evaluation's)."""
    return tuple(task.stop_strings if config.decoding.stop is None else config.decoding.stop)


def completion_text(completion: str | list[dict]) -> str:
    """TRL hands a chat prompt's completion as [{"role": "assistant", "content": …}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


class GRPORun:
    """One GRPO run in one process: the trainer, its sampler and reward, and the run folder's bookkeeping."""

    def __init__(self, config: GRPORunConfig, run: RunDir, loaded: LoadedModel, task: Task, train: list[Example],
                 test: list[Example], eval_sets: list[EvalSet]):
        self.config, self.run, self.task, self.train = config, run, task, train
        self.evaluator = ESRun(evaluation_config(config), run, loaded, task, [], test, eval_sets)
        self.evaluator.step_key = STEP
        self.tokenizer = self.evaluator.loaded.tokenizer
        self.stops = stop_strings(config, task)
        self.phase = {"generate": 0.0, "score": 0.0}  # seconds of the step in progress
        self.scores: list = []  # the step's training scores
        self.truncated = 0  # the step's completions that hit max_new_tokens before EOS or a stop string
        self.step_started = self.step_seconds = 0.0
        self.tracker: Tracker | None = None
        self.bar: tqdm | None = None
        self.stop_requested = False
        self.budget_spent = False  # grpo.max_seconds reached: the last step's θ is finish's to score
        self.update_skipped = False  # the step in progress had non-finite gradients and left θ as it was
        self.skipped_in_a_row = 0
        self.diverged = False  # more than grpo.max_skipped_updates steps in a row were skipped

    # -- θ: the trained model -> the evaluator's copy ---------------------------------------------------

    def trainable_model(self):
        """The model TRL trains: the base with LoRA added by TRL (lora), or with the target matrices trainable
        in float32 (full: a bf16 master would round away updates of the size GRPO makes)."""
        model_config = self.config.model
        if self.config.grpo.space.kind == "full":
            model_config = model_config.model_copy(update={"dtype": "float32"})
        model = load_model(model_config).model
        if self.config.grpo.space.kind == "full":
            for name in self.evaluator.engine.layers:
                model.get_submodule(name).weight.requires_grad_(True)
        return model

    def peft_config(self):
        space = self.config.grpo.space
        if space.kind != "lora":
            return None
        from peft import LoraConfig

        return LoraConfig(r=space.rank, lora_alpha=space.alpha, target_modules=space.target_modules,
                          layers_to_transform=space.layers, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    @torch.no_grad()
    def sync_theta(self, model) -> None:
        """The evaluator's θ becomes the trained model's (its LoRA factors, or its target matrices)."""
        params = self.evaluator.strategy.params
        if self.config.grpo.space.kind == "lora":
            theta = self.evaluator.space.params_of(Adapter.of_peft_model(model).factors)
            for name, value in theta.items():
                params[name].copy_(value)
        else:
            for name in params:
                params[name].copy_(model.get_submodule(name).weight)

    # -- what TRL calls ---------------------------------------------------------------------------------

    def rollout(self, prompts: list, trainer) -> dict:
        """The step's completions from θ through the engine; TRL repeats each prompt group_size times."""
        start = time.perf_counter()
        self.sync_theta(trainer.model)
        prompt_ids = [render(self.tokenizer, Example(prompt)) for prompt in prompts]
        grpo = self.config.grpo
        sampling = replace(self.evaluator.sampling(trainer.state.global_step), temperature=grpo.temperature,
                           top_p=grpo.top_p)
        out = self.evaluator.space.generate_center(self.evaluator.strategy.params, prompt_ids, sampling)
        completion_ids = out.tokens[0]  # the engine cuts each row's tokens at its first stop string
        self.truncated += sum(map(self.is_truncated, completion_ids, out.texts[0]))
        self.phase["generate"] += time.perf_counter() - start
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    def is_truncated(self, ids: list[int], text: str) -> bool:
        """Cut by max_new_tokens, not ended by the model (TRL's own clipped_ratio counts every completion
        without a final EOS, so one that ends at a stop string such as countdown's </answer> counts too);
        `text` is the engine's decoded completion of `ids`."""
        if len(ids) < self.config.decoding.max_new_tokens or ids[-1] in self.evaluator.engine.eos_token_ids:
            return False
        return not cut_at_stop(text, self.stops)[1]

    def reward(self, prompts: list, completions: list, index: list[int], **_) -> list[float]:
        """The task's score of each completion (cut at the stop strings, as evaluation cuts them)."""
        start = time.perf_counter()
        scores = [self.task.checked_score(cut_at_stop(completion_text(c), self.stops)[0], self.train[i], i)
                  for c, i in zip(completions, index)]
        self.scores += scores
        self.phase["score"] += time.perf_counter() - start
        return [s.reward for s in scores]

    # -- the step's bookkeeping (TrainerCallback hooks, see make_callback) ------------------------------

    def step_begin(self) -> None:
        self.step_started = time.perf_counter()
        self.phase = {"generate": 0.0, "score": 0.0}
        self.scores = []
        self.truncated = 0
        self.update_skipped = False

    @torch.no_grad()
    def skip_non_finite_update(self, model, control) -> None:
        """Before AdamW steps: gradients with a NaN or inf are dropped, so the step leaves θ as it was (a NaN
        gradient would make every weight NaN, and a NaN model still samples, scores and exports)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.skipped_in_a_row = 0
            return
        for param in model.parameters():
            param.grad = None  # torch's optimizers leave a parameter without a gradient untouched
        self.update_skipped = True
        self.skipped_in_a_row += 1
        limit = self.config.grpo.max_skipped_updates
        log.warning("non-finite gradients: this step's update is skipped (%d in a row; the run stops after %d)",
                    self.skipped_in_a_row, limit + 1)
        if self.skipped_in_a_row > limit:
            self.diverged = True
            control.should_training_stop = True

    def step_end(self, control) -> None:
        """Onto the clock; stop (with a checkpoint) at grpo.max_seconds or on a requested stop."""
        self.step_seconds = time.perf_counter() - self.step_started
        clock = self.evaluator.clock
        clock["seconds"] += self.step_seconds
        clock["completions"] += len(self.scores)
        budget = self.config.grpo.max_seconds
        if self.diverged:
            log.error("%d steps in a row had non-finite gradients (grpo.max_skipped_updates=%d): the run stops "
                      "as diverged with the last finite θ", self.skipped_in_a_row, self.config.grpo.max_skipped_updates)
            control.should_save = True
        elif (budget is not None and clock["seconds"] >= budget) or self.stop_requested:
            if not self.stop_requested:
                log.info("grpo.max_seconds=%g reached after %.1f training seconds", budget, clock["seconds"])
                self.budget_spent = True  # this step's θ is the final one: finish scores it
            control.should_training_stop = True
            control.should_save = True

    def record_step(self, step: int, logs: dict, model) -> None:
        """A history row (and an evaluation when it is due), written before TRL's checkpoint of the step."""
        every = self.config.eval.every
        t_eval, evaluations = 0.0, {}
        if every and step % every == 0 and step < self.config.grpo.steps and not (self.budget_spent or self.diverged):
            start = time.perf_counter()
            evaluations = self.evaluate(step, model, base_or_final=False)
            t_eval = time.perf_counter() - start
        verdicts = [s.correct for s in self.scores if s.correct is not None]
        clock = self.evaluator.clock
        row = {
            STEP: step - 1,  # as an ES generation g, the step that led from θ_g to θ_{g+1}
            "mean": logs.get("reward"), "reward_std": logs.get("reward_std"),
            "accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
            "kl": logs.get("kl"), "loss": logs.get("loss"), "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"), "entropy": logs.get("entropy"),
            "completion_length": logs.get("completions/mean_length"),
            "truncated_ratio": self.truncated / len(self.scores) if self.scores else None,
            "frac_reward_zero_std": logs.get("frac_reward_zero_std"), "update_skipped": self.update_skipped,
            "completions": len(self.scores),
            "tokens": round((logs.get("completions/mean_length") or 0.0) * len(self.scores)),
            "prompts": self.config.grpo.prompts_per_step,
            "clock": dict(clock),
            "time": {"generate": self.phase["generate"], "score": self.phase["score"],
                     "update": self.step_seconds - self.phase["generate"] - self.phase["score"], "eval": t_eval},
        }
        if evaluations.get(TEST_SET):
            row["test"] = evaluations[TEST_SET]
        append_jsonl(self.run.history_file, row)
        if self.tracker:
            scalars = {f"train/{k}": row[k] for k in ("mean", "reward_std", "accuracy", "kl", "loss", "grad_norm",
                                                      "learning_rate", "entropy", "completion_length")}
            self.tracker.log(scalars | {f"time/{k}": v for k, v in row["time"].items()}, step - 1)
        if self.bar is not None:
            self.bar.update(1)
            test = headline_metric(row["test"])[1] if row.get("test") else None
            self.bar.set_postfix_str(f"reward={row['mean']:.4g}" + ("" if test is None else f" test={test:.4g}"))

    def evaluate(self, step: int, model, base_or_final: bool) -> dict[str, dict]:
        self.sync_theta(model)
        return self.evaluator.evaluate_all(step, base_or_final)

    # -- the run ----------------------------------------------------------------------------------------

    def restore(self) -> Path | None:
        """The last checkpoint, with result lines after it dropped and the clock as it stood; None: a fresh run."""
        checkpoint = last_checkpoint(self.run)
        done = checkpoint_step(checkpoint)
        history = [r for r in read_jsonl(self.run.history_file) if r[STEP] < done]
        write_jsonl(self.run.history_file, history)
        write_jsonl(self.run.evaluations_file, [r for r in read_jsonl(self.run.evaluations_file) if r[STEP] <= done])
        if history:
            self.evaluator.clock = dict(history[-1]["clock"])
        self.evaluator.restore_best()
        return checkpoint

    def trainer(self):
        from datasets import Dataset
        from transformers import PrinterCallback, ProgressCallback
        from trl import GRPOConfig, GRPOTrainer

        grpo, loaded = self.config.grpo, self.evaluator.loaded
        completions = grpo.prompts_per_step * grpo.group_size
        args = GRPOConfig(
            output_dir=str(self.run.checkpoints), max_steps=grpo.steps, learning_rate=grpo.learning_rate,
            lr_scheduler_type=grpo.lr_scheduler, beta=grpo.beta, num_generations=grpo.group_size,
            per_device_train_batch_size=completions // grpo.gradient_accumulation_steps,
            gradient_accumulation_steps=grpo.gradient_accumulation_steps, max_grad_norm=grpo.max_grad_norm,
            loss_type=grpo.loss_type, scale_rewards=grpo.scale_rewards, temperature=grpo.temperature,
            top_p=grpo.top_p, max_completion_length=self.config.decoding.max_new_tokens, seed=self.config.seed,
            save_strategy="steps", save_steps=grpo.save_every, save_total_limit=1, logging_steps=1, report_to=[],
            disable_tqdm=True, bf16=loaded.dtype == torch.bfloat16, fp16=loaded.dtype == torch.float16,
            use_cpu=loaded.device.type == "cpu", **grpo.trl,
        )
        data = Dataset.from_list([{"prompt": e.prompt, "index": i} for i, e in enumerate(self.train)])
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented, experimental hook
        trainer = GRPOTrainer(model=self.trainable_model(), reward_funcs=self.reward, args=args, train_dataset=data,
                              processing_class=self.tokenizer, peft_config=self.peft_config(),
                              rollout_func=self.rollout, callbacks=[make_callback(self)])
        for quiet in (PrinterCallback, ProgressCallback):  # evolm's own bar and log replace TRL's dict per step
            trainer.remove_callback(quiet)
        return trainer

    def finished_already(self, done: int) -> dict | None:
        """The summary of a run that its last session finished at `done` steps with nothing left to train (the
        steps or the time budget spent), else None. TRL's trainer, resumed at max_steps, would train one more."""
        grpo, clock = self.config.grpo, self.evaluator.clock
        if done < grpo.steps and (grpo.max_seconds is None or clock["seconds"] < grpo.max_seconds):
            return None
        if not self.run.summary_file.is_file():
            return None
        summary = json.loads(self.run.summary_file.read_text())
        return summary if summary.get("status") == "finished" and summary.get("steps") == done else None

    def train_loop(self) -> dict:
        checkpoint = self.restore()
        start = checkpoint_step(checkpoint)
        finished = self.finished_already(start)
        if finished is not None:
            log.info("nothing to do: the run finished at step %d (grpo.steps %d, grpo.max_seconds %s)", start,
                     self.config.grpo.steps, self.config.grpo.max_seconds)
            return {**finished, "steps_this_session": 0}
        started = time.time()
        atomic_write_text(self.run.config_file, dump_config(self.config))
        self.tracker = Tracker(self.config.logging, self.config.model_dump(), self.run.logs)
        self.evaluator.tracker = self.tracker
        trainer = self.trainer()
        self.bar = tqdm(total=self.config.grpo.steps, initial=start, desc="GRPO", unit="step",
                        disable=not self.config.logging.progress, dynamic_ncols=True)
        status, self.abandoned = "finished", False
        try:
            with self.stops_after_the_step():
                if start == 0 and 0 not in {r[STEP] for r in read_jsonl(self.run.evaluations_file)}:
                    for name, metrics in self.evaluate(0, trainer.model, base_or_final=True).items():
                        log.info("base model %s metrics: %s", name, format_metrics(metrics))
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            if self.diverged:
                status = "diverged"
            elif self.stop_requested:
                status = "interrupted"
        except KeyboardInterrupt:
            status, self.abandoned = "interrupted", True
            log.warning("interrupted: the step in progress is abandoned; the last checkpoint is kept")
        finally:
            self.bar.close()
        return self.finish(trainer, status, time.time() - started, start)

    @contextmanager
    def stops_after_the_step(self):
        """Ctrl-C or SIGTERM: finish the step, checkpoint it and stop; a second one stops at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("stop requested: finishing this step and its checkpoint first (again to stop at once)")

        with stop_signals_to(handler):
            yield

    def finish(self, trainer, status: str, wall_time: float, start: int) -> dict:
        step = trainer.state.global_step
        if not self.abandoned:  # θ is a whole step's: scored where the run finished, and exported
            self.sync_theta(trainer.model)
            if status in SCORED:
                self.evaluator.evaluate_final(step)
            self.evaluator.export(self.run.export_dir(self.config.grpo.space.kind))
        history = read_jsonl(self.run.history_file)
        summary = {
            "status": status, "optimizer": "grpo", "steps": step,
            "stopped_by_max_seconds": status == "finished" and step < self.config.grpo.steps,
            **evaluations_summary(read_jsonl(self.run.evaluations_file), STEP, step, status in SCORED),
            "best": self.evaluator.best,
            "training_seconds": self.evaluator.clock["seconds"], "completions": self.evaluator.clock["completions"],
            "tokens_generated": sum(h["tokens"] for h in history),
            "skipped_updates": sum(bool(h.get("update_skipped")) for h in history),
            "wall_time_s_this_session": wall_time,
            "steps_this_session": step - start,
            "device": str(self.evaluator.loaded.device),
            "dtype": str(self.evaluator.loaded.dtype).removeprefix("torch."),
            "model": self.config.model.name_or_path, "task": self.config.task.name,
        }
        atomic_write_text(self.run.summary_file, json.dumps(summary, indent=2))
        reports.write_figures(self.run.root)
        self.tracker.close()
        log.info("run %s: %s after %d steps; base %s, final %s", self.run.root, status, step,
                 format_metrics(summary["base"]), format_metrics(summary["final"]))
        return summary


def make_callback(grpo_run: GRPORun):
    """The TrainerCallback that hands TRL's step events to the run."""
    from transformers import TrainerCallback

    class Bookkeeping(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            grpo_run.step_begin()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grpo_run.skip_non_finite_update(model, control)

        def on_step_end(self, args, state, control, **kwargs):
            grpo_run.step_end(control)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if logs and "loss" in logs:  # a step's log, not the summary of train()
                grpo_run.record_step(state.global_step, logs, model)

    return Bookkeeping()


def run_grpo(config_source: str | None, overrides: list[str], *, resume: str | None = None,
             overwrite: bool = False) -> tuple[RunDir, dict]:
    """Validate, load data and the model; only then create (or continue) the run folder; train; summarise."""
    config, run, changes = prepare_run(config_source, overrides, resume=resume, overwrite=overwrite)
    task, train, test, eval_sets = load_examples(config)
    check_subset_size("grpo.prompts_per_step", config.grpo.prompts_per_step, train,  # else TRL trains 0 steps
                      f"a step takes that many distinct ones: pick at most {len(train)}")
    if stop_strings(config, task) and config.grpo.trl.get("mask_truncated_completions"):
        raise ConfigError(f"grpo.trl.mask_truncated_completions: TRL takes every completion without a final EOS "
                          f"for truncated, so it would also mask those ending at the stop strings "
                          f"{list(stop_strings(config, task))}; leave it off (history's truncated_ratio counts "
                          "the completions max_new_tokens cut)")
    torch.manual_seed(config.seed)
    loaded = load_model(config.model)  # the evaluator's copy; GRPORun.trainable_model loads TRL's
    check_targets(loaded.model, config.grpo.space.target_modules, "grpo.space.target_modules", config.grpo.space.layers)
    grpo_run = GRPORun(config, run, loaded, task, train, test, eval_sets)
    if resume:
        append_jsonl(run.resumes_file, {"time": time.time(), "changed": changes})
    else:
        run = grpo_run.run = grpo_run.evaluator.run = RunDir.create(run.root, overwrite)
    with log_to_file(run.logs / "run.log"):
        log.info("grpo: model %s on %s (%s); %d train / %d test examples", config.model.name_or_path,
                 grpo_run.evaluator.loaded.device, grpo_run.evaluator.loaded.dtype, len(train), len(test))
        summary = grpo_run.train_loop()
    return run, summary
