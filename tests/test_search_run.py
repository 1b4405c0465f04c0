"""`evolm search` end to end on a tiny random model: run folder, lineage, export, analysis, seed
reproducibility, refusal to clobber, kill -9 and resume with two workers, atomic claims.

A tiny random model answers nothing right (accuracy 0); these tests check the machinery."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.processes import default_sigint

from evolm.config import ConfigError
from evolm.runs import RunDirError
from evolm.search import analyze, run_search
from evolm.search.config import SearchSpace
from evolm.search.evolution import Plan
from evolm.search.genes import Genes
from evolm.search.store import Store
from evolm.search.training import attach, inherit, save_adapter
from evolm.tasks import TaskError

SLOW_TASK = '''
import os, time
from evolm.tasks.qa import GSM8KTask

class SlowGSM8K(GSM8KTask):
    """gsm8k whose scoring sleeps SLOW_SCORE_S seconds, so a test can kill a run mid-generation."""

    def score(self, completion, example):
        time.sleep(float(os.environ.get("SLOW_SCORE_S", "0")))
        return super().score(completion, example)
'''


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("search-data") / "sums.jsonl"
    rows = [{"problem": f"Tom has {a} apples and buys {b} more. How many now?", "answer": str(a + b)}
            for a in range(12) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", f"task.train={data}", f"output_dir={out}", "space.ranks=[2,4]",
            "fitness.max_new_tokens=8", "training.batch_size=4", "training.max_length=160", *extra]


def variants(run_dir: Path):
    store = Store(run_dir / "run.db")
    try:
        return store.variants()
    finally:
        store.close()


@pytest.fixture(scope="module")
def pipeline_run(tiny_llama, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search-runs") / "pipeline"
    return run_search("gsm8k", overrides(tiny_llama, data_file, out, "baseline=default-lora"), mode="pipeline")


def test_pipeline_run_fills_the_run_folder(pipeline_run, tiny_llama):
    rows = variants(pipeline_run)
    assert [(v.generation, v.state) for v in rows] == [(0, "done")] * 3 + [(1, "done")] * 3
    assert all(v.attempts == 1 and v.fitness is not None and v.metrics["perplexity"] > 0 for v in rows)
    by_id = {v.id: v for v in rows}
    for v in rows[3:]:
        assert v.parents and all(by_id[p].generation == 0 for p in v.parents)
        assert v.init_from in v.parents
    survivors = [v for v in rows if v.origin == "survivor"]
    assert len(survivors) == 2 and all(v.metrics["inherited_tensors"] > 0 for v in survivors)
    assert all((pipeline_run / v.adapter / "adapter_model.safetensors").is_file() for v in rows)
    assert all((pipeline_run / "variants" / str(v.id) / "completions.jsonl").is_file() for v in rows)
    history = [json.loads(line) for line in (pipeline_run / "results" / "history.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history] == [0, 1] and all(len(h["members"]) == 3 for h in history)
    assert {"mean", "std", "min", "max", "p20", "p80"} <= history[0].keys()
    summary = json.loads((pipeline_run / "results" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["best"]["fitness"] == max(v.fitness for v in rows)
    assert summary["validation"]["fitness"] == summary["best"]["fitness"]


def test_three_recorded_splits_share_no_row(pipeline_run, data_file):
    records = [json.loads(line) for line in (pipeline_run / "splits.jsonl").read_text().splitlines()]
    assert [(r["split"], len(r["rows"]), r["source"]) for r in records] == \
        [("train", 15, str(data_file)), ("validation", 15, str(data_file)), ("test", 15, str(data_file))]
    rows = [i for r in records for i in r["rows"]]
    assert len(set(rows)) == 45 and sorted(rows) != list(range(45))  # disjoint, and a shuffle, not the head
    # every variant was scored on the validation rows
    assert all(len((pipeline_run / "variants" / str(v.id) / "completions.jsonl").read_text().splitlines()) == 15
               for v in variants(pipeline_run))


def test_the_test_split_scores_base_baseline_and_best_once_at_the_end(pipeline_run, tiny_llama):
    rows = variants(pipeline_run)
    summary = json.loads((pipeline_run / "results" / "summary.json").read_text())
    test = json.loads((pipeline_run / "results" / "test.json").read_text())
    assert test["variant"] == summary["best"]["id"] and test["examples"] == 15
    assert summary["status"] == "finished" and summary["stopped_by_max_seconds"] is False
    assert set(test["metrics"]) == {"base", "best", "default_lora"}
    assert summary["base"] == test["metrics"]["base"] and summary["final"] == test["metrics"]["best"]
    assert summary["test"]["default_lora"] == test["metrics"]["default_lora"]
    for key in ("best_vs_base", "default_lora_vs_base", "best_vs_default_lora"):
        counts = test["comparisons"][key]
        assert sum(v for k, v in counts.items() if k != "sign_test_p") == 15 and "sign_test_p" in counts
    detail = test["examples_detail"]
    assert len(detail) == 15 and {"base", "best", "default_lora", "best_correct"} <= detail[0].keys()

    # the baseline: peft's default LoRA recipe, trained for the steps behind the best variant's weights
    baseline = json.loads((pipeline_run / "results" / "baseline.json").read_text())
    by_id = {v.id: v for v in rows}
    best, steps = by_id[summary["best"]["id"]], 0
    while True:
        steps += best.metrics["steps"]
        if best.init_from is None or not best.metrics["inherited_tensors"]:
            break
        best = by_id[best.init_from]
    assert baseline["lineage_steps"] == steps == baseline["validation"]["steps"] > rows[0].metrics["steps"]
    adapter = json.loads((pipeline_run / baseline["adapter"] / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (16, 32, ["q_proj", "v_proj"])
    assert baseline["genes"]["learning_rate"] == 2e-4

    # a resumed finished run scores nothing again
    stamp = (pipeline_run / "results" / "test.json").stat().st_mtime_ns
    run_search(None, [], resume=str(pipeline_run))
    assert (pipeline_run / "results" / "test.json").stat().st_mtime_ns == stamp


def test_a_spent_seconds_budget_makes_the_generation_in_progress_the_last(tiny_llama, data_file, tmp_path):
    """evolution.max_seconds: generation 0's variants spend the tiny budget, so no generation 1 is bred, yet the
    run finishes as a run does (best exported, the test split scored) and says why it stopped early; a resume
    breeds nothing more."""
    out = run_search("gsm8k", overrides(tiny_llama, data_file, tmp_path / "run", "evolution.max_seconds=0.001"),
                     mode="pipeline")
    assert {v.generation for v in variants(out)} == {0} and len(variants(out)) == 3
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stopped_by_max_seconds"] is True
    assert summary["generations_completed"] == 1
    assert json.loads((out / "results" / "test.json").read_text())["variant"] == summary["best"]["id"]
    run_search(None, [], resume=str(out))
    assert len(variants(out)) == 3
    assert "3 of 6 (fewer once evolution.max_seconds, 0.001 s" in analyze(out).read_text()


def test_best_adapter_is_a_peft_folder(pipeline_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = pipeline_run / "best_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder)
    best = json.loads((pipeline_run / "results" / "summary.json").read_text())["best"]
    assert model.peft_config["default"].r == best["genes"]["rank"]


def test_analyze_writes_figures_and_report(pipeline_run):
    report = analyze(pipeline_run)
    figures = {"family_tree.png", "timeline.png", "hyperparameter_heatmap.png", "survival.png",
               "mutation_effectiveness.png"}
    assert figures <= {p.name for p in (pipeline_run / "analysis").iterdir()}
    text = report.read_text()
    for heading in ("## Test split", "## Best variant", "## Generations", "## Mutation effectiveness", "## Survival",
                    "![Family tree]"):
        assert heading in text
    assert text.index("## Test split") < text.index("## Best variant")  # the test numbers are the headline
    assert "Splits (`splits.jsonl`): train 15 rows, validation 15 rows, test 15 rows." in text
    for line in ("| base model |", "| default LoRA |", "| best variant (", "| best variant ("):
        assert line in text
    assert "vs default LoRA |" in text and "default LoRA vs base model |" in text
    with pytest.raises(ConfigError, match="not an evolm search run folder"):
        analyze(pipeline_run / "variants")


def test_same_seed_same_run(pipeline_run, tiny_llama, data_file, tmp_path):
    again = run_search("gsm8k", overrides(tiny_llama, data_file, tmp_path / "again"), mode="pipeline")
    assert [(v.genes, v.origin, v.parents, v.fitness) for v in variants(again)] == \
           [(v.genes, v.origin, v.parents, v.fitness) for v in variants(pipeline_run)]


def test_a_child_inherits_its_parents_function(tiny_llama):
    """Same rank, other alpha and dropout: the inherited adapter computes exactly the parent's update."""
    from transformers import AutoModelForCausalLM

    space = SearchSpace()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[5, 9, 23, 40, 41]])
    parent_genes, child_genes = Genes(4, 1.0, 1e-3, 0.0, "attention", 1), Genes(4, 2.0, 1e-3, 0.1, "attention", 1)
    parent = attach(base, parent_genes, space)
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if "lora_B" in name:
                p.normal_()
    parent.eval()
    expected = parent(input_ids=ids).logits
    save_adapter(parent, Path(tiny_llama).parent / "parent-adapter")
    base = parent.unload()
    child = attach(base, child_genes, space)
    assert inherit(child, Path(tiny_llama).parent / "parent-adapter", parent_genes, child_genes) > 0
    child.eval()
    torch.testing.assert_close(child(input_ids=ids).logits, expected)
    child.unload()


def test_greedy_answers_on_the_engine_match_peft_generate(tiny_qwen):
    """The variant's adapter (a module subset of the engine's layers) read into the population engine
    gives the same greedy text as PEFT + generate."""
    from transformers import AutoModelForCausalLM

    from evolm.adapters import Adapter
    from evolm.config import ModelConfig
    from evolm.models import load_tokenizer
    from evolm.search.fitness import GreedyAnswers

    space = SearchSpace()
    genes = Genes(4, 2.0, 1e-3, 0.0, "qv", 1)
    tokenizer = load_tokenizer(str(tiny_qwen))
    model = attach(AutoModelForCausalLM.from_pretrained(tiny_qwen), genes, space)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.eval()
    prompts = [tokenizer(text).input_ids for text in ("Hello there", "What is 2+2?", "abc")]
    expected = []
    for prompt in prompts:
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))
    answers = GreedyAnswers(ModelConfig(name_or_path=str(tiny_qwen), device="cpu"), tokenizer,
                            space.target_modules["all_linear"], [tokenizer.eos_token_id], batch_rows=8)
    assert answers(model, prompts, 12, ()) == expected
    assert len(set(expected)) > 1

    # the base model and adapters of other ranks and scales, as members of one generation, answer as alone;
    # a saved adapter reads back as the same member
    first = Adapter.of_peft_model(model)
    save_adapter(model, Path(tiny_qwen).parent / "greedy-adapter")
    assert answers.of_adapters([Adapter.of_folder(Path(tiny_qwen).parent / "greedy-adapter")], prompts, 12, ()) \
        == [expected]
    base = model.unload()
    plain = [tokenizer.decode(base.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                              [0, len(prompt):], skip_special_tokens=True) for prompt in prompts]
    other_genes = Genes(2, 0.5, 1e-3, 0.0, "attention", 1)
    other = attach(base, other_genes, space)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    alone = answers(other, prompts, 12, ())
    second = Adapter.of_peft_model(other)
    other.unload()
    assert answers.of_adapters([None, first, second], prompts, 12, ()) == [plain, expected, alone]
    assert len({tuple(plain), tuple(expected), tuple(alone)}) == 3


def test_self_targets_train_on_the_models_own_correct_answers_refreshed_from_the_best(tiny_llama, data_file,
                                                                                        tmp_path):
    from transformers import AutoTokenizer

    from evolm.search.targets import TARGETS_FILE

    out = tmp_path / "self"
    args = overrides(tiny_llama, data_file, out, "task.name=helpers.even_task:EvenLengthGSM8K",
                     "training.targets=self", "training.self_samples=1", "training.self_temperature=1.0",
                     "training.refresh_targets_every=1")
    run_search("gsm8k", args, mode="pipeline")
    rows = [json.loads(line) for line in (out / TARGETS_FILE).read_text().splitlines()]
    train = [r["answers"] for r in rows if r["split"] == "train"]
    assert len(train) == 15 and len([r for r in rows if r["split"] == "validation"]) == 15
    answers = [a for kept in train for a in kept]
    assert answers and all(len(a) % 2 == 0 for a in answers)  # only answers the task scores correct
    assert all(len(kept) <= 1 for kept in train)  # at most one per sample
    assert sum(not kept for kept in train) > 0  # some questions got no right answer: they are left out
    # generation 0 learned exactly those answers, each followed by the end-of-sequence token
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def tokens(targets: list[list[str]]) -> int:
        return sum(len(tokenizer(a, add_special_tokens=False).input_ids) + 1 for kept in targets for a in kept)

    trained = variants(out)
    assert all(v.metrics["train_tokens"] == tokens(train) for v in trained if v.generation == 0)

    # generation 1 learned targets resampled from generation 0's best variant: right answers only, and a
    # question it answered wrong keeps its earlier targets
    refreshed = [json.loads(line)["answers"] for line in (out / "self_targets_gen1.jsonl").read_text().splitlines()]
    assert len(refreshed) == 15 and refreshed != train
    assert all(len(a) % 2 == 0 for kept in refreshed for a in kept)
    assert all(new for new, old in zip(refreshed, train) if old)  # no question loses its targets
    assert all(v.metrics["train_tokens"] == tokens(refreshed) for v in trained if v.generation == 1)

    answered = sum(bool(kept) for kept in train)
    report = analyze(out).read_text()
    assert f"train split: {answered} of 15 questions have a correct sampled answer ({len(answers)} answers)" in report
    assert "refreshed from the best variant for generations 1" in report
    # resuming reads the targets instead of sampling new ones
    stamps = [(out / name).stat().st_mtime_ns for name in (TARGETS_FILE, "self_targets_gen1.jsonl")]
    run_search(None, [], resume=str(out))
    assert [(out / name).stat().st_mtime_ns for name in (TARGETS_FILE, "self_targets_gen1.jsonl")] == stamps


def test_self_targets_with_no_right_answer_stop_with_advice(tiny_llama, data_file, tmp_path):
    args = overrides(tiny_llama, data_file, tmp_path / "never", "task.name=helpers.even_task:NeverRightGSM8K",
                     "training.targets=self", "training.self_samples=2")
    with pytest.raises(TaskError, match="raise training.self_samples"):
        run_search("gsm8k", args, mode="pipeline")


def test_refuses_a_non_empty_folder_and_validates_before_touching_anything(tiny_llama, data_file, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty.*--overwrite"):
        run_search("gsm8k", overrides(tiny_llama, data_file, busy), mode="pipeline")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    fresh = tmp_path / "fresh"
    with pytest.raises(TaskError, match="not found"):
        run_search("gsm8k", overrides(tiny_llama, tmp_path / "missing.jsonl", fresh), mode="pipeline")
    with pytest.raises(ConfigError, match="unknown field 'evolution.elite'"):
        run_search("gsm8k", overrides(tiny_llama, data_file, fresh, "evolution.elite=2"))
    assert not fresh.exists()


def test_resume_refuses_to_change_what_the_run_means(pipeline_run):
    with pytest.raises(ConfigError, match="cannot change evolution.population"):
        run_search(None, ["evolution.population=8"], resume=str(pipeline_run))
    with pytest.raises(ConfigError, match="apply when a run starts"):
        run_search(None, [], resume=str(pipeline_run), mode="quick")


def _python(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=default_sigint)


def _slow_env(tmp_path: Path) -> dict:
    (tmp_path / "slowtask.py").write_text(textwrap.dedent(SLOW_TASK))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


def _wait_until_busy(process: subprocess.Popen, db_path: Path, done: int) -> None:
    """Return once `done` variants are scored and another is being worked on."""
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if db_path.is_file():
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)  # read only: it creates nothing
            try:
                states = [s for (s,) in db.execute("SELECT state FROM variants")]
            except sqlite3.OperationalError:  # the run is still creating its tables (or holds the write lock)
                states = []
            finally:
                db.close()
            if states.count("done") >= done and "running" in states:
                return
        time.sleep(0.1)
    raise AssertionError(f"the run never got busy: {process.stdout.read().decode() if process.stdout else ''}")


def test_ctrl_c_gives_the_variant_back(tiny_llama, data_file, tmp_path):
    out = tmp_path / "interrupted"
    args = ["gsm8k", "--pipeline-test", *overrides(tiny_llama, data_file, out, "task.name=slowtask:SlowGSM8K")]
    code = f"from evolm.cli import app; app({['search', *args]!r})"
    process = _python(code, dict(_slow_env(tmp_path), SLOW_SCORE_S="0.3"))
    _wait_until_busy(process, out / "run.db", done=0)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 130 and "--resume" in output, output
    states = [(v.state, v.worker) for v in variants(out)]
    assert ("pending", None) in states and all(state != "running" for state, _ in states), states


def test_kill_mid_generation_then_resume_with_two_workers(pipeline_run, tiny_llama, data_file, tmp_path):
    env = _slow_env(tmp_path)
    out = tmp_path / "killed"
    args = overrides(tiny_llama, data_file, out, "task.name=slowtask:SlowGSM8K")
    start = f"from evolm.search import run_search; run_search('gsm8k', {args!r}, mode='pipeline')"
    first = _python(start, dict(env, SLOW_SCORE_S="0.3"))
    _wait_until_busy(first, out / "run.db", done=1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {v.id: v for v in variants(out)}
    killed = [v.id for v in before.values() if v.state == "running"]
    assert len(killed) == 1

    join = f"from evolm.search import run_search; run_search(None, ['workers.poll_s=0.2'], resume={str(out)!r})"
    workers = [_python(join, dict(env, SLOW_SCORE_S="0.05")) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=180) == 0, worker.stdout.read().decode()

    after = variants(out)
    assert [v.state for v in after] == ["done"] * 6
    for v in after:  # nothing lost, nothing trained twice, finished work untouched
        assert v.attempts == (2 if v.id in killed else 1)
        if v.id in before and before[v.id].state == "done":
            assert (v.finished, v.fitness) == (before[v.id].finished, before[v.id].fitness)
    by_id = {v.id: v for v in after}
    assert all(by_id[p].generation == v.generation - 1 for v in after for p in v.parents)
    # and the interrupted run ends exactly where the uninterrupted one did
    assert [(v.genes, v.parents, v.fitness) for v in after] == \
           [(v.genes, v.parents, v.fitness) for v in variants(pipeline_run)]
    assert (out / "best_adapter" / "adapter_model.safetensors").is_file()


def _claim_all(path: str) -> list[int]:
    store = Store(Path(path))
    claimed = []
    while (variant := store.claim(f"worker-{os.getpid()}")) is not None:
        claimed.append(variant.id)
    store.close()
    return claimed


def test_claims_are_atomic_across_processes(tmp_path):
    store = Store(tmp_path / "run.db")
    genes = Genes(4, 1.0, 1e-4, 0.0, "qv", 1)
    store.add_generation(lambda generation, _: [Plan(genes, "initial")] * 60)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        shares = pool.map(_claim_all, [str(tmp_path / "run.db")] * 4)
    claimed = [i for share in shares for i in share]
    assert sorted(claimed) == [v.id for v in store.variants()]  # each variant handed out exactly once
    assert all(v.state == "running" and v.attempts == 1 for v in store.variants())


def test_claims_of_dead_workers_are_requeued(tmp_path):
    store = Store(tmp_path / "run.db")
    store.add_generation(lambda generation, _: [Plan(Genes(4, 1.0, 1e-4, 0.0, "qv", 1), "initial")] * 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    first = store.claim(f"{socket.gethostname()}:{dead.pid}")
    second = store.claim(f"{socket.gethostname()}:{os.getpid()}")
    assert store.requeue_stale(stale_after_s=3600) == [first.id]
    assert store.get(first.id).state == "pending" and store.get(second.id).state == "running"
    store.beat(second.id, "someone else")
    time.sleep(0.05)
    assert store.requeue_stale(stale_after_s=0.01) == [second.id]


def test_the_end_of_run_stage_goes_to_one_worker_and_to_another_when_that_one_dies(tmp_path):
    import socket

    store = Store(tmp_path / "run.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone, alive, other = f"{socket.gethostname()}:{dead.pid}", f"{socket.gethostname()}:{os.getpid()}", "elsewhere:1"
    assert store.claim_stage("final", gone, stale_after_s=3600) == "claimed"
    assert store.claim_stage("final", alive, stale_after_s=3600) == "claimed"  # its process is gone: taken over
    assert store.claim_stage("final", other, stale_after_s=3600) == "busy"
    store.end_stage("final", alive, done=False)  # an error or Ctrl-C gives it back
    assert store.claim_stage("final", other, stale_after_s=3600) == "claimed"
    store.end_stage("final", alive, done=True)  # not its claim: nothing happens
    assert store.claim_stage("final", alive, stale_after_s=3600) == "busy"
    store.end_stage("final", other, done=True)
    assert store.claim_stage("final", alive, stale_after_s=0) == "done"


def test_command_line_functions(tiny_llama, data_file, tmp_path):
    from typer.testing import CliRunner

    from evolm.cli import app

    out = tmp_path / "cli"
    started = CliRunner().invoke(app, ["search", "gsm8k", "--pipeline-test", *overrides(tiny_llama, data_file, out)])
    assert started.exit_code == 0, started.output
    refused = CliRunner().invoke(app, ["search", "gsm8k", *overrides(tiny_llama, data_file, out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    resumed = CliRunner().invoke(app, ["search", "--resume", str(out), "workers.poll_s=1"])
    assert resumed.exit_code == 0, resumed.output
    analyzed = CliRunner().invoke(app, ["analyze", str(out)])
    assert analyzed.exit_code == 0 and (out / "analysis" / "report.md").is_file()


def test_eval_sets_score_the_best_variant_and_the_base_at_the_end(pipeline_run, data_file, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(pipeline_run, run_dir)
    sets = [f"eval.sets.head={data_file}[0:5]", f"eval.sets.tail={data_file}[-3:]"]
    run_search(None, sets, resume=str(run_dir))  # a finished run: only the new sets are scored
    report = json.loads((run_dir / "results" / "eval_sets.json").read_text())
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert report["variant"] == summary["best"]["id"]
    assert {name: r["examples"] for name, r in report["sets"].items()} == {"head": 5, "tail": 3}
    for name in ("head", "tail"):
        assert set(summary["sets"][name]) >= {"base", "best", "comparison"}
        assert sum(summary["sets"][name]["comparison"].values()) == report["sets"][name]["examples"]


def test_a_bad_eval_set_source_stops_the_search_before_its_folder_exists(tiny_llama, data_file, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(TaskError, match="^eval.sets.gone: data file not found"):
        run_search("gsm8k", overrides(tiny_llama, data_file, out, f"eval.sets.gone={tmp_path / 'gone.jsonl'}"),
                   mode="pipeline")
    assert not out.exists()


def test_train_loss_is_the_mean_over_the_steps_taken(tiny_llama, data_file):
    """One step's loss is measured before its update, so a single step reports the base model's loss
    for every variant alike; the mean over several steps tells a faster learner apart."""
    from transformers import AutoModelForCausalLM

    from evolm.models import load_tokenizer
    from evolm.search.config import TrainingConfig
    from evolm.search.data import encode
    from evolm.search.training import train
    from evolm.tasks import load_task

    tokenizer = load_tokenizer(str(tiny_llama))
    task = load_task("gsm8k")
    examples = task.load_split("train", str(data_file))[:6]
    rows = encode(tokenizer, [(ex, task.answer_text(ex)) for ex in examples], 160, tokenizer.eos_token_id)

    def trained(learning_rate: float, **training) -> dict:
        genes = Genes(4, 1.0, learning_rate, 0.0, "attention", 1)
        model = attach(AutoModelForCausalLM.from_pretrained(tiny_llama), genes, SearchSpace())
        return train(model, rows, genes, TrainingConfig(batch_size=2, warmup_ratio=0.0, **training), seed=0,
                     pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), heartbeat=lambda: None)

    slow, fast = trained(1e-6), trained(1e-2)
    assert slow["steps"] == fast["steps"] == 3
    assert fast["train_loss"] < slow["train_loss"] - 0.05 and fast["last_step_loss"] < fast["train_loss"]
    one_slow, one_fast = trained(1e-6, max_steps=1), trained(1e-2, max_steps=1)
    assert one_slow["train_loss"] == pytest.approx(one_fast["train_loss"]) == one_fast["last_step_loss"]


def test_pipeline_mode_caps_the_rank_and_takes_several_steps(pipeline_run):
    import yaml

    config = yaml.safe_load((pipeline_run / "config.yaml").read_text())
    assert max(config["space"]["ranks"]) <= 8 and config["training"]["gradient_accumulation"] == 1
    assert all(v.metrics["steps"] >= 2 for v in variants(pipeline_run))
    best = json.loads((pipeline_run / "results" / "summary.json").read_text())["best"]
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # hard links, not a second copy
        assert (pipeline_run / "best_adapter" / name).samefile(pipeline_run / best["adapter"] / name)
