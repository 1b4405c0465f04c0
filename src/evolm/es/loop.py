"""The ES loop: one generation is ask, evaluate, tell, check, evaluate θ, record, checkpoint.

`ESRun` holds a run's state in one process (strategy, space, engine, clock, best θ); its life around the
loop (prepare, create or resume the run folder, load, export) is runner.py's.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evolm import distributed, reports
from evolm.config import TEST_SET, ESRunConfig, SpaceConfig, dump_config
from evolm.counter_hash import stream_key
from evolm.engine import PopulationEngine
from evolm.engine.sampling import SamplingParams
from evolm.es.full_lowrank_space import FullLowRankSpace
from evolm.es.full_space import FullSpace
from evolm.es.lora_space import LoRASpace
from evolm.es.space import Space
from evolm.es.strategy import EvolutionStrategy, Population
from evolm.metrics import FITNESS_STATISTICS, fitness_statistics, headline_metric
from evolm.models import LoadedModel, eos_token_ids
from evolm.runs import (
    RunDir,
    RunDirError,
    append_jsonl,
    atomic_write_text,
    evaluations_by_set,
    evaluations_summary,
    read_jsonl,
    stop_signals_to,
    write_jsonl,
)
from evolm.scoring import render_all, score_all, summarize
from evolm.tasks import Example, Task
from evolm.tasks.splits import EvalSet
from evolm.tracking import Tracker, format_metrics

log = logging.getLogger("evolm")

FLAT_GENERATIONS = 3  # generations in a row in which every member scored the same before the run warns


@dataclass
class PromptSet:
    """A split's examples and their rendered prompt token ids, in the same order."""

    examples: list[Example]
    prompt_ids: list[list[int]]


class ESRun:
    """One ES run in one process (or one of several under torchrun: a share of the members each)."""

    step_key = "generation"  # what an evaluation row calls its step (`evolm grpo` evaluates with an ESRun too)

    def __init__(self, config: ESRunConfig, run: RunDir, loaded: LoadedModel, task: Task,
                 train: list[Example], test: list[Example], eval_sets: list[EvalSet] = ()):
        self.config, self.run, self.task = config, run, task
        self.process_rank, self.world_size = distributed.world()  # this process among torchrun's
        self.is_main = self.process_rank == 0
        self.loaded = loaded
        tokenizer = loaded.tokenizer
        self.train = PromptSet(train, render_all(tokenizer, train))
        # what θ is scored on: the test split (when there is one) first, then eval.sets in config order
        sets = ([EvalSet(TEST_SET, task, test)] if test else []) + list(eval_sets)
        self.eval_sets = {s.name: (s.task, PromptSet(s.examples, render_all(tokenizer, s.examples))) for s in sets}
        self.best: dict | None = None  # eval.keep_best's best evaluation so far
        space_cfg = config.space
        gen = config.decoding
        self.engine = PopulationEngine(
            loaded.model, tokenizer, space_cfg.target_modules, space_cfg.layers,
            eos_token_ids=eos_token_ids(loaded.model, tokenizer),
            max_batch_rows=gen.max_batch_rows, memory_fraction=gen.memory_fraction,
            kv_cache_dtype=gen.kv_cache_dtype,
        )
        self.space = make_space(config.space, self.engine, keep_base=config.eval.kl)
        self.strategy = self.new_strategy()
        self.members = distributed.member_share(config.es.population, self.process_rank, self.world_size)
        self.tracker: Tracker | None = None
        self.checkpointed: int | None = None  # the generation of the checkpoint on disk
        self.flat = 0  # generations in a row in which every member scored the same
        self.warnings: list[str] = []
        # the one clock of ES and GRPO runs: training seconds (evaluation excluded) and sampled completions so far
        self.clock = {"seconds": 0.0, "completions": 0}

    def new_strategy(self) -> EvolutionStrategy:
        """The strategy at generation 0 (θ₀ from the space: the base weights, or LoRA's init)."""
        es = self.config.es
        params = {n: p.to(self.loaded.device) for n, p in self.space.initial_params(self.config.seed).items()}
        return EvolutionStrategy(
            params, population=es.population, sigma=es.sigma, learning_rate=es.learning_rate,
            antithetic=es.antithetic, fitness_shaping=es.fitness, optimizer=es.optimizer,
            weight_decay=es.weight_decay, betas=es.adam_betas, seed=self.config.seed, noise_rank=self.space.noise_rank,
        )

    # -- evaluation ---------------------------------------------------------------------------

    def sampling(self, generation: int, max_new_tokens: int | None = None, task: Task | None = None) -> SamplingParams:
        gen = self.config.decoding
        return SamplingParams(
            max_new_tokens=max_new_tokens or gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
            stop_strings=tuple((task or self.task).stop_strings if gen.stop is None else gen.stop),
            seed=stream_key(self.config.seed, generation)[0],
        )

    def prompt_indices(self, generation: int) -> list[int]:
        """All training prompts, or the generation's slice of a cycle through them."""
        m, k = len(self.train.prompt_ids), self.config.es.prompts_per_generation
        if k is None or k >= m:
            return list(range(m))
        return [(generation * k + j) % m for j in range(k)]

    def evaluate_population(self, population: Population, generation: int) -> tuple[torch.Tensor, Cost]:
        """Every member's mean reward on this generation's prompts (every process gets all N), and its cost."""
        indices = self.prompt_indices(generation)
        examples = [self.train.examples[i] for i in indices]
        t0 = time.perf_counter()
        out = self.space.generate_population(population, self.members, [self.train.prompt_ids[i] for i in indices],
                                             self.sampling(generation))
        t1 = time.perf_counter()
        local = {m: summarize(score_all(self.task, examples, texts))["reward"]
                 for m, texts in zip(self.members, out.texts)}
        fitness = distributed.gather_fitness(local, self.config.es.population, self.loaded.device)
        return fitness, Cost(tokens=out.num_tokens, prompts=len(indices), generate=t1 - t0,
                             score=time.perf_counter() - t1, generate_parts=out.seconds, row_steps=out.row_steps)

    def evaluate_theta(self, generation: int, name: str = TEST_SET) -> tuple[dict, list[dict]]:
        """Metrics of the unperturbed θ (greedy by default) on one evaluation set, with its completions."""
        if name not in self.eval_sets:
            return {}, []
        task, prompts = self.eval_sets[name]
        out = self.space.generate_center(self.strategy.params, prompts.prompt_ids,
                                         self.sampling(generation, self.config.eval.max_new_tokens, task))
        scores = score_all(task, prompts.examples, out.texts[0])
        metrics = summarize(scores, task)
        if self.config.eval.kl:
            metrics |= self.engine.kl(prompts.prompt_ids, out.tokens[0], self.space.policy, self.space.reference)
        rows = [
            {"index": i, "completion": text, "reward": s.reward, "correct": s.correct}
            for i, (text, s) in enumerate(zip(out.texts[0], scores))
        ]
        return metrics, rows

    def evaluate_all(self, generation: int, base_or_final: bool, skip: Collection[str] = ()) -> dict[str, dict]:
        """Score θ on the evaluation sets (but `skip`) and record each; {set name: metrics}. The base and the
        final θ get every set, their completions kept; the evaluations in between skip eval.final_sets."""
        results = {}
        for name in self.eval_sets:
            if name not in skip and (base_or_final or name not in self.config.eval.final_sets):
                metrics, rows = self.evaluate_theta(generation, name)
                self.record_evaluation(generation, name, metrics, rows,
                                       base_or_final or self.config.eval.keep_completions == "every")
                results[name] = metrics
        return results

    def evaluate_final(self, generation: int) -> None:
        """The final θ on the sets not yet scored at its generation (one due anyway, at a multiple of
        eval.every, scored the others without eval.final_sets)."""
        done = {row.get("set", TEST_SET) for row in read_jsonl(self.run.evaluations_file)
                if row[self.step_key] == generation}
        self.evaluate_all(generation, base_or_final=True, skip=done)

    # -- bookkeeping ----------------------------------------------------------------------------

    def record_evaluation(self, generation: int, name: str, metrics: dict, rows: list[dict],
                          keep_completions: bool) -> None:
        """One line of results/evaluations.jsonl per set and generation; TensorBoard tags `NAME/metric`."""
        if not self.is_main or not metrics:
            return
        append_jsonl(self.run.evaluations_file, {self.step_key: generation, "set": name, **self.clock, **metrics})
        if keep_completions:
            prefix = "completions" if name == TEST_SET else f"completions_{name}"
            write_jsonl(self.run.results / f"{prefix}_gen{generation:05d}.jsonl", rows)
        if self.tracker:
            self.tracker.log({f"{name}/{k}": v for k, v in metrics.items()}, generation)
        if name == self.config.eval.keep_best:
            self.consider_best(generation, metrics)

    def consider_best(self, generation: int, metrics: dict) -> None:
        """Keep θ of `generation` when it beats the best so far on eval.keep_best's set (ties keep the earlier).

        A small θ (lora) is exported at once to best/adapter; the full spaces' θ is the model itself, so only
        the generation is recorded and the weights are rebuilt at the end by replaying the fitness log."""
        metric, value = headline_metric(metrics)
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"set": self.config.eval.keep_best, "metric": metric, "value": value, "generation": generation}
        if self.space.params_in_checkpoint:
            self.space.export(self.strategy.params, self.run.best_export_dir(self.space.kind),
                              self.config.model.name_or_path)
        atomic_write_text(self.run.best_file, json.dumps(self.best, indent=2))
        log.info("best θ so far on %s: generation %d, %s %.4g", self.best["set"], generation, metric, value)

    def restore_best(self) -> None:
        """The best evaluation so far, from the (trimmed) evaluations file: what a resumed run compares with."""
        name = self.config.eval.keep_best
        rows = evaluations_by_set(read_jsonl(self.run.evaluations_file)).get(name, []) if name else []
        self.best = None
        for row in rows:  # file order is generation order, so ties keep the earlier generation
            metric, value = headline_metric(row)
            if self.best is None or value > self.best["value"]:
                self.best = {"set": name, "metric": metric, "value": value, "generation": row[self.step_key]}
        if self.is_main and self.best is not None:  # a best recorded after the checkpoint is forgotten with it
            atomic_write_text(self.run.best_file, json.dumps(self.best, indent=2))

    def checkpoint(self) -> None:
        if self.is_main:
            state = self.strategy.state_dict(with_params=self.space.params_in_checkpoint)
            self.run.save_checkpoint({"strategy": state, "config": self.config.model_dump()})
        self.checkpointed = self.strategy.generation

    def restore(self) -> int:
        """Load the checkpoint if there is one; trim result files written after it. Returns the generation."""
        state = self.run.load_checkpoint()
        if state is None:
            if self.is_main:
                write_jsonl(self.run.history_file, [])
                write_jsonl(self.run.evaluations_file, [])
            return 0
        self.strategy.load_state_dict(state["strategy"])
        self.checkpointed = self.strategy.generation
        self.trim_results()
        self.restore_best()
        history = read_jsonl(self.run.history_file)
        self.clock = {"seconds": sum(training_seconds(h["time"]) for h in history),
                      "completions": sum(len(h["fitness"]) * h["prompts"] for h in history)}
        return self.strategy.generation

    def trim_results(self) -> None:
        """Drop result lines written after the checkpoint (a stop between the two writes)."""
        g = self.strategy.generation
        if self.is_main:
            history = [r for r in read_jsonl(self.run.history_file) if r["generation"] < g]
            if [r["generation"] for r in history] != list(range(g)):
                raise RunDirError(
                    f"{self.run.history_file} holds {len(history)} of the {g} generations the checkpoint has done "
                    "(the file is empty or damaged); put the run's own copy back, or start a new run, since "
                    "continuing would leave the record of this run without them")
            write_jsonl(self.run.history_file, history)
            write_jsonl(self.run.evaluations_file,
                        [r for r in read_jsonl(self.run.evaluations_file) if r["generation"] <= g])

    # -- the loop -------------------------------------------------------------------------------

    def train_loop(self) -> dict:
        config, es = self.config, self.config.es
        start = self.restore()
        started = time.time()
        if self.is_main:
            atomic_write_text(self.run.config_file, dump_config(config))
            self.tracker = Tracker(config.logging, config.model_dump(), self.run.logs)
        evaluated = {r["generation"] for r in read_jsonl(self.run.evaluations_file)}
        bar = tqdm(total=es.generations, initial=start, desc="ES", unit="gen",
                   disable=not (self.is_main and config.logging.progress), dynamic_ncols=True)
        status = "finished"
        try:
            with _sigterm_as_interrupt():
                if start == 0 and 0 not in evaluated:
                    for name, metrics in self.evaluate_all(0, base_or_final=True).items():
                        log.info("base model %s metrics: %s", name, format_metrics(metrics))
                for g in range(start, es.generations):
                    if self.out_of_time():
                        break
                    row = self.one_generation(g)
                    bar.update(1)
                    bar.set_postfix_str(_postfix(row))
        except KeyboardInterrupt:
            status = "interrupted"  # update, history line and checkpoint are one step (see one_generation)
            log.warning("interrupted: the generation in progress is abandoned; the checkpoint at generation %d is kept",
                        self.strategy.generation)
        except Exception as exc:
            self.record_failure(exc, time.time() - started)
            raise
        finally:
            bar.close()
        try:
            return self.finish(status, time.time() - started, start)
        except Exception as exc:  # the final evaluation or the export: the run is not done
            self.record_failure(exc, time.time() - started)
            raise

    def budget_spent(self) -> bool:
        """Whether es.max_seconds of training are spent (on the clock that counts every session's)."""
        budget = self.config.es.max_seconds
        # the clock rank 0 records
        return budget is not None and distributed.main_value(self.clock["seconds"], self.loaded.device) >= budget

    def out_of_time(self) -> bool:
        if not self.budget_spent():
            return False
        log.info("es.max_seconds=%g reached after %.1f training seconds", self.config.es.max_seconds,
                 self.clock["seconds"])
        return True

    def one_generation(self, g: int) -> dict:
        population = self.strategy.ask()
        fitness, cost = self.evaluate_population(population, g)  # a stop during this abandons the generation
        with _deferred_interrupts():  # from the update to its checkpoint a stop waits: all of it lands or none
            t0 = time.perf_counter()
            update = self.strategy.tell(fitness)
            cost.update = time.perf_counter() - t0
            self.clock["seconds"] += cost.training_seconds
            self.clock["completions"] += self.config.es.population * cost.prompts
            self.check_theta(g)
            evaluations = self.evaluate_when_due(cost)
            row = history_row(g, fitness.numpy(), cost, update, evaluations)
            self.record(row)
            self.checkpoint()
        return row

    def check_theta(self, g: int) -> None:
        bad = [n for n, p in self.strategy.params.items() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f"θ became non-finite in generation {g} (e.g. {bad[0]}): {self.step_advice()}")

    def evaluate_when_due(self, cost: Cost) -> dict[str, dict]:
        """θ after the update on every evaluation set, every eval.every generations. The last θ is finish's to
        score, whether es.generations or es.max_seconds ends the run, so its completions are kept."""
        every, done = self.config.eval.every, self.strategy.generation
        if not (every and done % every == 0 and done < self.config.es.generations) or self.budget_spent():
            return {}
        t0 = time.perf_counter()
        evaluations = self.evaluate_all(done, base_or_final=False)
        cost.eval = time.perf_counter() - t0
        return evaluations

    def record(self, row: dict) -> None:
        """The history line (and TensorBoard's scalars) of a generation."""
        self.note_flat_fitness(row["generation"], np.asarray(row["fitness"]))
        if not self.is_main:
            return
        append_jsonl(self.run.history_file, row)
        if self.tracker:
            metrics = {f"fitness/{k}": row[k] for k in FITNESS_STATISTICS}
            metrics["speed/tokens_per_s"] = row["tokens_per_s"]
            self.tracker.log(metrics | {f"time/{k}": v for k, v in row["time"].items()}, row["generation"])

    def step_advice(self) -> str:
        """What a user can do about a step that broke θ: a lora run resumes with a smaller step, a full-weight
        run's step is frozen (its checkpoint is replayed with it), so it starts anew."""
        smaller = "a smaller es.learning_rate or es.sigma"
        if self.config.space.kind == "lora" and self.checkpointed:
            return (f"continue from the checkpoint of generation {self.checkpointed} with {smaller}: "
                    f"evolm es --resume {self.run.root} es.learning_rate=…")
        return f"start the run again with {smaller} (evolm es CONFIG --overwrite es.learning_rate=…)"

    def note_flat_fitness(self, g: int, fitness: np.ndarray) -> None:
        """Warn (once) when every member scores the same for several generations: the update is zero, so
        nothing is learned (σ far too small or too large, or a reward that does not depend on the text)."""
        self.flat = self.flat + 1 if np.ptp(fitness) == 0 else 0
        if self.flat == FLAT_GENERATIONS and not self.warnings:
            self.warnings.append(
                f"every member scored {fitness[0]:.4g} in generations {g - FLAT_GENERATIONS + 1} to {g}: the update "
                "is zero and nothing is learned; change es.sigma (the members' outputs must differ) or check that "
                "the task's reward depends on the completion")
            log.warning(self.warnings[-1])

    def export(self, path: Path) -> Path:
        """θ as a PEFT adapter folder (lora) or a Hugging Face model folder (full spaces)."""
        exported = self.space.export(self.strategy.params, path, self.config.model.name_or_path)
        log.info("exported generation %d to %s", self.strategy.generation, exported)
        return exported

    def record_failure(self, exc: Exception, wall_time: float) -> None:
        """A summary saying the run failed and where it can resume from; best effort, as the failure may
        be the full disk that this write needs too."""
        if not self.is_main:
            return
        summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "generations": self.checkpointed,
                   "resume_from": self.checkpointed, "wall_time_s_this_session": wall_time}
        try:
            atomic_write_text(self.run.summary_file, json.dumps(summary, indent=2))
        except OSError:
            log.warning("could not write %s either", self.run.summary_file)

    def finish(self, status: str, wall_time: float, start: int) -> dict:
        """The final evaluation, export and summary; `start`: the generation this session began at."""
        g = self.strategy.generation
        if status == "finished":
            self.evaluate_final(g)
        if not self.is_main:
            return {}
        if self.config.export:
            self.export(self.run.export_dir(self.space.kind))
            if self.best is not None and not self.space.params_in_checkpoint and self.best["generation"] == g:
                self.export(self.run.best_export_dir(self.space.kind))  # else run_es replays the log to it
        history = read_jsonl(self.run.history_file)
        summary = {
            "status": status,
            "generations": g,
            "stopped_by_max_seconds": status == "finished" and g < self.config.es.generations,
            **evaluations_summary(read_jsonl(self.run.evaluations_file), self.step_key, g, status == "finished"),
            "best": self.best,
            "best_mean_fitness": max((h["mean"] for h in history), default=None),
            "training_seconds": self.clock["seconds"], "completions": self.clock["completions"],
            "tokens_generated": sum(h["tokens"] for h in history),
            "wall_time_s_this_session": wall_time,
            "generations_this_session": g - start,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "world_size": self.world_size,
            "model": self.config.model.name_or_path,
            "task": self.config.task.name,
            "warnings": self.warnings,
        }
        atomic_write_text(self.run.summary_file, json.dumps(summary, indent=2))
        reports.write_figures(self.run.root)
        if self.tracker:
            self.tracker.close()
        log.info("run %s: %s after %d generations; base %s, final %s", self.run.root, status, g,
                 format_metrics(summary["base"]), format_metrics(summary["final"]))
        return summary


@dataclass
class Cost:
    """What one generation took: tokens, prompts, and seconds by phase (generate_parts: shares of generate)."""

    tokens: int
    prompts: int
    generate: float
    score: float
    update: float = 0.0
    eval: float = 0.0
    generate_parts: dict[str, float] = field(default_factory=dict)
    row_steps: int = 0  # rows the engine decoded, summed over its steps (padding included)

    @property
    def training_seconds(self) -> float:
        return training_seconds(self.seconds())

    def seconds(self) -> dict[str, float]:
        return {"generate": self.generate, "score": self.score, "update": self.update, "eval": self.eval} | {
            f"generate.{part}": t for part, t in self.generate_parts.items()}


def training_seconds(seconds: dict[str, float]) -> float:
    """The clock ES and GRPO runs are compared on: a generation's seconds without its evaluation."""
    return seconds["generate"] + seconds["score"] + seconds["update"]


def history_row(generation: int, fitness: np.ndarray, cost: Cost, update: dict, evaluations: dict[str, dict]) -> dict:
    """One line of results/history.jsonl: every member's fitness and their statistics, what the generation
    cost, the update's norms, and θ's evaluations after it (the test split as "test", eval.sets as "sets")."""
    row = {
        "generation": generation,
        "fitness": fitness.tolist(),
        **fitness_statistics(fitness),
        "best_member": int(fitness.argmax()),
        "tokens": cost.tokens, "prompts": cost.prompts,
        "tokens_per_s": cost.tokens / max(cost.generate, 1e-9),
        "row_steps": cost.row_steps,  # tokens / row_steps: the share of the decoded rows that wrote a token
        "time": cost.seconds(),
        **update,
    }
    if evaluations.get(TEST_SET):
        row["test"] = evaluations[TEST_SET]
    if any(name != TEST_SET for name in evaluations):
        row["sets"] = {name: metrics for name, metrics in evaluations.items() if name != TEST_SET}
    return row


def make_space(config: SpaceConfig, engine: PopulationEngine, keep_base: bool = False) -> Space:
    """The space of `space.kind`; keep_base keeps the base weights of full spaces (for KL to the base)."""
    if config.kind == "lora":
        return LoRASpace(engine.shapes(), config.rank, config.alpha, init=config.init, layers=config.layers,
                         engine=engine)
    if config.kind == "full-lowrank":
        return FullLowRankSpace(engine, config.rank, keep_base)
    return FullSpace(engine, keep_base)


def _postfix(row: dict) -> str:
    text = f"mean={row['mean']:.4g} best={row['max']:.4g} tok/s={row['tokens_per_s']:.0f}"
    metric = headline_metric(row["test"])[1] if row.get("test") else None
    return text + (f" test={metric:.4g}" if metric is not None else "")


@contextmanager
def _deferred_interrupts():
    """Ctrl-C or SIGTERM inside waits until the block is done, then stops the run as usual."""
    received = []

    def handler(signum, frame):
        if not received:
            log.warning("stop requested: finishing this generation's update and checkpoint first")
        received.append(signum)

    with stop_signals_to(handler):
        yield
    if received:
        raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt():
    """A scheduler's SIGTERM gets the same clean stop as Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    with stop_signals_to(handler, (signal.SIGTERM,)):
        yield
