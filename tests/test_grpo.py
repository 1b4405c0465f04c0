"""`evolm grpo` end to end with TRL on a tiny real model; comparing runs on one clock; one model against another."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import build_tiny_model
from helpers import runs
from helpers.runs import LETTER_TASK
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evolm.cli import app
from evolm.comparison import comparison_figure, read_curve
from evolm.config import ConfigError
from evolm.engine.decoding import cut_at_stop
from evolm.evaluation import EvalOptions, evaluate_adapter, load_data_sets
from evolm.grpo.config import load_grpo_config
from evolm.grpo.loop import GRPORun, run_grpo
from evolm.runs import read_jsonl
from evolm.tasks import load_task

GRPO_RUN = {
    "model": {"device": "cpu"},
    "task": {"options": {"prompts": 2}},
    "decoding": {"max_new_tokens": 6, "stop": ["!"]},
    "eval": {"every": 1},
    # log_completions: TRL writes each step's completions and rewards, which the test checks
    "grpo": {"steps": 2, "group_size": 2, "prompts_per_step": 2, "learning_rate": 0.05, "save_every": 1,
             "trl": {"gradient_checkpointing": False, "log_completions": True}},
}


def write_config(path: Path, model: Path, out: Path, **grpo) -> Path:
    return runs.write_config(path, model, out, GRPO_RUN, grpo=grpo)


def test_grpo_writes_an_evolm_run_folder_and_its_rewards_are_the_tasks(tiny_llama, tmp_path):
    run, summary = run_grpo(str(write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")), [])
    assert summary["status"] == "finished" and summary["steps"] == 2
    for name in ("config.yaml", "results/summary.json", "figures/evolution.png", "figures/time_breakdown.png",
                 "model/config.json", "model/evolm.json", "logs/run.log", "checkpoints/checkpoint-2/trainer_state.json"):
        assert (run.root / name).is_file(), name
    assert any((run.root / "logs" / "tensorboard").iterdir())
    history = read_jsonl(run.history_file)
    assert [h["step"] for h in history] == [0, 1]
    assert [h["completions"] for h in history] == [4, 4]  # 2 prompts × 2 completions
    assert all(set(h["time"]) == {"generate", "score", "update", "eval"} and h["loss"] is not None for h in history)
    # the trainer's rewards are the task's scores of its completions (cut at the stop string)
    task = load_task(LETTER_TASK, {"prompts": 2})
    for step, h in enumerate(history, 1):
        logged = pd.read_parquet(run.root / "checkpoints" / "completions" / f"completions_{step:05d}.parquet")
        texts = [c[-1]["content"] if not isinstance(c, str) else c for c in logged["completion"]]
        assert all(len(t) <= 6 for t in texts)
        expected = [task.score(cut_at_stop(t, ["!"])[0], None).reward for t in texts]
        assert logged["reward"].tolist() == pytest.approx(expected)
        assert h["mean"] == pytest.approx(sum(expected) / len(expected))
    # one clock: every evaluation row says how far training had got, evaluation excluded
    evaluations = read_jsonl(run.evaluations_file)
    assert [(e["step"], e["completions"]) for e in evaluations] == [(0, 0), (1, 4), (2, 8)]
    assert evaluations[0]["seconds"] == 0 < evaluations[1]["seconds"] < evaluations[2]["seconds"]
    assert evaluations[2]["seconds"] == pytest.approx(sum(h["time"]["generate"] + h["time"]["score"] +
                                                          h["time"]["update"] for h in history))
    assert summary["base"]["step"] == 0 and summary["final"]["step"] == 2
    # evaluation is evolm's: the exported model, scored by `evolm evaluate`, gets the run's final metrics
    report = evaluate_adapter(run.model_dir, EvalOptions(task=LETTER_TASK, max_new_tokens=6, stop=["!"],
                                                         task_options={"prompts": 2}, device="cpu"))
    assert report["adapter_metrics"]["reward"] == pytest.approx(summary["final"]["reward"])


def test_grpo_eval_kl_measures_how_far_theta_moved(tiny_llama, tmp_path):
    """eval.kl in a GRPO run: KL(θ ‖ base) on the test prompts, none at step 0, some once θ moved (conciseness:
    a reward that differs between any two lengths, so every group has an advantage)."""
    config = runs.write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", GRPO_RUN,
                               task={"name": "conciseness", "train_size": 2, "test_size": 2, "options": {}},
                               decoding={"max_new_tokens": 8, "stop": []}, eval={"every": 2, "kl": True})
    run, summary = run_grpo(str(config), [])
    evaluations = read_jsonl(run.evaluations_file)
    assert [e["step"] for e in evaluations] == [0, 2]
    assert evaluations[0]["kl"] == pytest.approx(0, abs=1e-6) and evaluations[1]["kl"] > 1e-4, evaluations


def test_only_completions_max_new_tokens_cut_count_as_truncated(tiny_llama, tmp_path):
    """TRL's clipped_ratio takes every completion without a final EOS for cut, those ending at a stop string too;
    truncated_ratio counts those that reached max_new_tokens unended (one ending at a stop string on its last
    token is not). TRL's mask_truncated_completions would mask them all: refused before any model loads."""
    stops = ["a", "e", "i", "o", "u", "t", "n", "s", "r", " "]  # common bytes: some completions end at one
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    with pytest.raises(ConfigError, match="mask_truncated_completions"):
        run_grpo(str(config), ["grpo.trl.mask_truncated_completions=true"])
    assert not (tmp_path / "run").exists()
    run, _ = run_grpo(str(config), [f"decoding.stop={json.dumps(stops)}"])
    ratios = []
    for step, h in enumerate(read_jsonl(run.history_file), 1):
        logged = pd.read_parquet(run.root / "checkpoints" / "completions" / f"completions_{step:05d}.parquet")
        texts = [c[-1]["content"] if not isinstance(c, str) else c for c in logged["completion"]]
        ratios.append(h["truncated_ratio"])
        assert h["truncated_ratio"] == sum(not any(s in t for s in stops) for t in texts) / len(texts), texts
    assert 0 < min(ratios) and max(ratios) < 1  # both kinds of ending occurred


def test_lora_grpo_resumes_from_its_checkpoint_and_continues_the_step_count(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", steps=1,
                          space={"kind": "lora", "rank": 2, "target_modules": ["q_proj", "v_proj"]})
    run, first = run_grpo(str(config), [])
    assert first["steps"] == 1
    with pytest.raises(ConfigError, match="grpo.group_size"):
        run_grpo(None, ["grpo.group_size=4"], resume=str(run.root))
    run, summary = run_grpo(None, ["grpo.steps=2"], resume=str(run.root))
    assert summary["steps"] == 2
    assert [h["step"] for h in read_jsonl(run.history_file)] == [0, 1]
    evaluations = read_jsonl(run.evaluations_file)
    assert [(e["step"], e["completions"]) for e in evaluations] == [(0, 0), (1, 4), (2, 8)]
    assert evaluations[1]["seconds"] < evaluations[2]["seconds"]  # the clock went on from where it stood
    assert read_jsonl(run.resumes_file)[-1]["changed"] == {"grpo.steps": [1, 2]}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run.adapter_dir)
    # resumed with its steps spent, it trains nothing (TRL's trainer, resumed at max_steps, would take one more)
    adapter = (run.adapter_dir / "adapter_model.safetensors").read_bytes()
    run, again = run_grpo(None, [], resume=str(run.root))
    assert again["steps"] == 2 and again["steps_this_session"] == 0
    assert [h["step"] for h in read_jsonl(run.history_file)] == [0, 1]
    assert [e["step"] for e in read_jsonl(run.evaluations_file)] == [0, 1, 2]
    assert sorted(p.name for p in run.checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == adapter


def nan_gradients_at(steps: set[int], monkeypatch) -> None:
    """Fault injection into a real run: the trained model's first weight gets a NaN gradient in these steps
    (one backward a step here), as a bf16 overflow gives one."""
    load = GRPORun.trainable_model
    backwards = []

    def trainable_model(self):
        model = load(self)
        weight = next(p for p in model.parameters() if p.requires_grad)

        def poison(grad):
            backwards.append(1)
            return grad * float("nan") if len(backwards) in steps else grad

        weight.register_hook(poison)
        return model

    monkeypatch.setattr(GRPORun, "trainable_model", trainable_model)


def test_a_step_with_non_finite_gradients_leaves_theta_as_it_was(tiny_llama, tmp_path, monkeypatch):
    """TRL would step AdamW with the NaN gradient and every weight would be NaN (the model then samples, scores
    and exports garbage); the step is skipped instead, and the history says so."""
    nan_gradients_at({2}, monkeypatch)
    config = runs.write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", GRPO_RUN,
                               task={"name": "conciseness", "train_size": 2, "test_size": 2, "options": {}},
                               decoding={"max_new_tokens": 8, "stop": []}, eval={"every": 1, "kl": True})
    run, summary = run_grpo(str(config), ["grpo.steps=3"])
    assert summary["status"] == "finished" and summary["steps"] == 3 and summary["skipped_updates"] == 1
    assert [h["update_skipped"] for h in read_jsonl(run.history_file)] == [False, True, False]
    kl = {e["step"]: e["kl"] for e in read_jsonl(run.evaluations_file)}
    assert kl[1] > 1e-4 and kl[2] == kl[1] and kl[3] != kl[2]  # θ did not move in step 2 only
    weights = load_file(run.model_dir / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_whose_gradients_stay_non_finite_stops_as_diverged_with_its_last_finite_theta(tiny_llama, tmp_path,
                                                                                          monkeypatch):
    nan_gradients_at({2, 3, 4, 5}, monkeypatch)
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", steps=6, max_skipped_updates=1)
    result = CliRunner().invoke(app, ["grpo", str(config)])
    assert result.exit_code == 1 and "diverged at step 3" in result.output, result.output
    summary = json.loads((tmp_path / "run" / "results" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 3 and summary["skipped_updates"] == 2
    assert summary["final"]["step"] == 3  # the last finite θ, scored
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_grpo_presets_share_the_es_presets_task_and_bad_fields_are_named():
    config = load_grpo_config("countdown", [])
    assert config.task.name == "countdown" and config.output_dir == "runs/countdown-grpo"
    assert config.decoding.max_new_tokens == 1024 and config.grpo.loss_type == "dapo"
    with pytest.raises(ConfigError, match="grpo.trl"):
        load_grpo_config("conciseness", ["grpo.trl.no_such_field=1"])
    with pytest.raises(ConfigError, match="divide"):
        load_grpo_config("conciseness", ["grpo.prompts_per_step=3", "grpo.group_size=3",
                                         "grpo.gradient_accumulation_steps=2"])


def test_more_prompts_a_step_than_the_data_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    """TRL would form no batch from 2 prompts at 3 a step and train 0 steps without a word."""
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", prompts_per_step=3)
    with pytest.raises(ConfigError, match="grpo.prompts_per_step=3: the training split has 2 prompts"):
        run_grpo(str(config), [])
    assert not (tmp_path / "run").exists()


def write_run(root: Path, optimizer: str, rows: list[tuple[int, float, int, float]],
              kl: dict[int, tuple[float, float]] | None = None) -> Path:
    """A run folder as `evolm es` or `evolm grpo` leaves it, with the given (step, seconds, completions, accuracy)
    and, where `kl` has the step, the test prompts' KL to the base (a completion, a token) as eval.kl records it."""
    step = "generation" if optimizer == "es" else "step"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({optimizer: {}, "task": {"name": "countdown"}}))
    (root / "results").mkdir()
    lines = [{step: s, "set": "test", "seconds": t, "completions": c, "reward": a, "accuracy": a,
              **(dict(zip(("kl", "kl_per_token"), kl[s])) if kl and s in kl else {})}
             for s, t, c, a in rows]
    lines.append({step: 0, "set": "other", "seconds": 0.0, "completions": 0, "reward": 9.0, "accuracy": 0.9})
    (root / "results" / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_analyze_puts_es_and_grpo_runs_on_one_clock(tmp_path):
    es = write_run(tmp_path / "es-run", "es", [(0, 0.0, 0, 0.1), (10, 50.0, 2400, 0.3)],
                   kl={0: (0.0, 0.0), 10: (2.5, 0.004)})
    grpo = write_run(tmp_path / "grpo-run", "grpo", [(0, 0.0, 0, 0.1), (5, 20.0, 80, 0.2), (10, 45.0, 160, 0.25)])
    (grpo / "results" / "summary.json").write_text(json.dumps({"status": "diverged"}))  # named wherever it shows
    result = CliRunner().invoke(app, ["analyze", str(es), str(grpo), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    for name in ("compare_time.png", "compare_completions.png", "compare.md"):
        assert (tmp_path / "cmp" / name).is_file()
    table = (tmp_path / "cmp" / "compare.md").read_text()
    final, equal_time = table.split("At equal training time")  # ES's evaluation at 50 s is past GRPO's 45 s
    assert "| es-run | es | accuracy 0.3 | 50.0 | 2400 | 10 | 2.5; 0.004 |" in final
    assert "| grpo-run | grpo, diverged | accuracy 0.25 | 45.0 | 160 | 10 | — |" in final  # this run measured no KL
    assert "| es-run | es | accuracy 0.1 | 0.0 | 0 | 0 | 0; 0 |" in equal_time
    assert "| grpo-run | grpo, diverged | accuracy 0.25 | 45.0 | 160 | 10 | — |" in equal_time
    curves = [read_curve(es), read_curve(grpo)]
    for clock, es_x, grpo_x in (("time", [0, 50], [0, 20, 45]), ("completions", [0, 2400], [0, 80, 160])):
        ax = comparison_figure(curves, clock).axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"es-run (es)", "grpo-run (grpo, diverged)"}  # the test split only, a line per run
        assert lines["es-run (es)"].get_xdata().tolist() == es_x
        assert lines["grpo-run (grpo, diverged)"].get_xdata().tolist() == grpo_x
        assert lines["grpo-run (grpo, diverged)"].get_ydata().tolist() == [0.1, 0.2, 0.25]
    assert (tmp_path / "cmp" / "compare_kl.png").is_file()
    kl = {line.get_label(): line for line in comparison_figure(curves, "kl").axes[0].get_lines()}
    assert list(kl) == ["es-run (es)"]  # metric against KL: only the run that measured it has a line
    assert kl["es-run (es)"].get_xdata().tolist() == [0.0, 2.5]
    assert kl["es-run (es)"].get_ydata().tolist() == [0.1, 0.3]
    other = write_run(tmp_path / "grpo-other", "grpo", [(0, 0.0, 0, 0.1), (10, 40.0, 160, 0.2)])
    result = CliRunner().invoke(app, ["analyze", str(grpo), str(other), "--out", str(tmp_path / "no-kl")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "no-kl" / "compare_kl.png").exists()  # neither measured KL: no empty figure
    assert CliRunner().invoke(app, ["analyze", str(es), str(grpo)]).exit_code == 2  # several runs need --out


def test_evaluate_against_counts_improvements_and_regressions_of_one_model_over_another(tiny_llama, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=3)
    options = EvalOptions(task="conciseness", max_new_tokens=8, limit=8, device="cpu", model=str(tiny_llama))
    sets = load_data_sets(options, {"test": None})
    report = evaluate_adapter(tiny_llama, options, sets=sets, against=other)
    detail = report["examples_detail"]
    up = sum(d["adapter_reward"] > d["against_reward"] for d in detail)
    down = sum(d["adapter_reward"] < d["against_reward"] for d in detail)
    assert report["comparison"]["improvements"] == up and report["comparison"]["regressions"] == down
    assert up + down > 0  # the two models write differently
    # each side is the model it names: its texts are what that model writes alone
    alone = evaluate_adapter(other, options, sets=sets, against=tiny_llama)
    assert [d["adapter"] for d in alone["examples_detail"]] == [d["against"] for d in detail]
    assert alone["comparison"]["improvements"] == down and alone["comparison"]["regressions"] == up
    assert report["against_metrics"]["reward"] == pytest.approx(alone["adapter_metrics"]["reward"])


def test_compare_pairs_saved_reports_and_run_completions_per_example_without_a_model(tiny_llama, tmp_path):
    """`evolm compare A B` from what was saved: two reports give the counts `evaluate --against` computes
    with both models loaded; a run folder's completions file pairs on the indices both answered; results of
    different recorded sources are refused. (Conciseness: a reward that differs between any two lengths.)"""
    other = build_tiny_model(tmp_path / "other", seed=3)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "Yes"}) + "\n"
                            for q in ["Is water wet?", "Name a fruit.", "Hi?", "Two plus two?", "Sky colour?"]))
    options = EvalOptions(task="conciseness", max_new_tokens=8, device="cpu", model=str(tiny_llama))
    sets = load_data_sets(options, {"questions": str(data)})
    base_report, other_report = tmp_path / "base.json", tmp_path / "other.json.gz"
    base_report.write_text(json.dumps(evaluate_adapter(tiny_llama, options, sets=sets)))
    with gzip.open(other_report, "wt") as file:
        json.dump(evaluate_adapter(other, options, sets=sets), file)
    against = evaluate_adapter(other, options, sets=sets, against=tiny_llama)
    assert against["comparison"]["improvements"] + against["comparison"]["regressions"] > 0
    result = CliRunner().invoke(app, ["compare", str(base_report), str(other_report), "--output",
                                      str(tmp_path / "cmp.json")])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "cmp.json").read_text())
    assert compared["comparison"] == against["comparison"] and compared["examples"] == 5
    assert compared["sources_recorded"] and compared["second"]["label"] == "other"

    # a run of the same task on the first 3 of those questions: its final completions pair on indices 0-2.
    # grpo.max_seconds ends it after step 1, which eval.every=1 makes due as well: scored once, as the final
    config = runs.write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", GRPO_RUN,
                               task={"name": "conciseness", "train_size": 2, "test": str(data), "test_size": 3,
                                     "options": {}},
                               decoding={"max_new_tokens": 8, "stop": []}, grpo={"steps": 3, "max_seconds": 1e-9})
    run, summary = run_grpo(str(config), [])
    assert summary["steps"] == 1 and [e["step"] for e in read_jsonl(run.evaluations_file)] == [0, 1]
    completions = run.results / "completions_gen00001.jsonl"
    result = CliRunner().invoke(app, ["compare", str(completions), str(other_report), "--output",
                                      str(tmp_path / "cmp2.json")])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "cmp2.json").read_text())
    with gzip.open(other_report, "rt") as file:
        detail = json.load(file)["examples_detail"][:3]
    rows = read_jsonl(completions)
    up = sum(d["adapter_reward"] > r["reward"] for r, d in zip(rows, detail))
    down = sum(d["adapter_reward"] < r["reward"] for r, d in zip(rows, detail))
    assert compared["examples"] == 3 and compared["first"]["label"] == "run test at 1"
    assert (compared["comparison"]["improvements"], compared["comparison"]["regressions"]) == (up, down)

    elsewhere = tmp_path / "elsewhere.jsonl"  # other records: refused, whatever their indices
    elsewhere.write_text(data.read_text())
    report = evaluate_adapter(other, options, sets=load_data_sets(options, {"questions": str(elsewhere)}))
    (tmp_path / "elsewhere.json").write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["compare", str(base_report), str(tmp_path / "elsewhere.json")])
    assert result.exit_code == 2 and "not the same records" in result.output
