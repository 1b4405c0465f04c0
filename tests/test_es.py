"""The ES loop end to end on a tiny real model: it learns, resumes bit-identically, refuses to clobber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import runs
from helpers.processes import default_sigint
from helpers.runs import LETTER_TASK
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evolm.config import ConfigError
from evolm.es.runner import run_es
from evolm.evaluation import EvalOptions, evaluate_adapter
from evolm.runs import RunDirError, read_jsonl

TESTS = Path(__file__).parent
# a lora run that learns the letter task on the tiny model
ES_RUN = {"space": {"rank": 2, "alpha": 2.0, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
          "es": {"generations": 12, "population": 8, "sigma": 1.0, "learning_rate": 1.0, "optimizer": "adam"},
          "decoding": {"max_new_tokens": 12}, "eval": {"every": 4}}


def write_config(path: Path, model: Path, out: Path, **sections) -> Path:
    return runs.write_config(path, model, out, ES_RUN, **sections)


def test_es_improves_reward_on_tiny_problem(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    run, summary = run_es(str(config), [])
    history = read_jsonl(run.history_file)
    assert [h["generation"] for h in history] == list(range(12))
    assert all(len(h["fitness"]) == 8 for h in history)
    early = sum(h["mean"] for h in history[:3]) / 3
    late = sum(h["mean"] for h in history[-3:]) / 3
    assert late > early + 0.2, f"mean fitness should rise clearly: {early:.3f} -> {late:.3f}"
    assert summary["final"]["reward"] > summary["base"]["reward"] + 0.2
    assert summary["status"] == "finished"
    evaluations = read_jsonl(run.evaluations_file)
    assert [e["generation"] for e in evaluations] == [0, 4, 8, 12]
    # one clock with evolm grpo: training seconds (evaluation excluded) and sampled completions so far
    assert [e["completions"] for e in evaluations] == [g * 8 * history[0]["prompts"] for g in (0, 4, 8, 12)]
    assert evaluations[-1]["seconds"] == pytest.approx(sum(h["time"]["generate"] + h["time"]["score"] +
                                                           h["time"]["update"] for h in history))
    assert evaluations[0]["seconds"] == 0 < evaluations[1]["seconds"] < evaluations[2]["seconds"]
    for name in ("figures/evolution.png", "figures/time_breakdown.png", "adapter/adapter_config.json",
                 "checkpoints/latest.pt", "config.yaml", "logs/run.log"):
        assert (run.root / name).is_file(), name
    assert any((run.root / "logs" / "tensorboard").iterdir())
    # the exported adapter is a PEFT adapter of that model
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    PeftModel.from_pretrained(base, run.adapter_dir)


def test_resume_is_bit_identical(tiny_llama, tmp_path):
    straight = write_config(tmp_path / "a.yaml", tiny_llama, tmp_path / "straight", es={"generations": 4})
    run_a, _ = run_es(str(straight), [])
    stopped = write_config(tmp_path / "b.yaml", tiny_llama, tmp_path / "stopped", es={"generations": 2})
    run_b, first = run_es(str(stopped), [])
    assert first["generations"] == 2
    run_b, _ = run_es(None, ["es.generations=4"], resume=str(run_b.root))
    a = load_file(run_a.adapter_dir / "adapter_model.safetensors")
    b = load_file(run_b.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert [h["fitness"] for h in read_jsonl(run_a.history_file)] == [
        h["fitness"] for h in read_jsonl(run_b.history_file)
    ]
    # the resumed run's clock went on from the checkpoint's
    assert read_jsonl(run_a.evaluations_file)[-1]["completions"] == read_jsonl(run_b.evaluations_file)[-1]["completions"]


def test_max_seconds_stops_after_the_generation_that_reaches_it_and_resume_counts_on(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", eval={"every": 0},
                          es={"generations": 3, "population": 4, "max_seconds": 1e-6})
    run, summary = run_es(str(config), [])
    assert summary["status"] == "finished" and summary["stopped_by_max_seconds"] and summary["generations"] == 1
    history = read_jsonl(run.history_file)
    assert len(history) == 1 and summary["final"] is not None  # θ after the generation that ran out is scored
    spent = sum(h["time"]["generate"] + h["time"]["score"] + h["time"]["update"] for h in history)
    assert summary["training_seconds"] == pytest.approx(spent) and summary["final"]["seconds"] == pytest.approx(spent)
    # the limit counts every session's seconds: a second hold with the same limit has none left
    _, again = run_es(None, [], resume=str(run.root))
    assert again["generations"] == 1 and again["stopped_by_max_seconds"]
    _, rest = run_es(None, ["es.max_seconds=null"], resume=str(run.root))
    assert rest["generations"] == 3 and not rest["stopped_by_max_seconds"]
    evaluations = read_jsonl(run.evaluations_file)
    assert [e["generation"] for e in evaluations] == [0, 1, 3]
    history = read_jsonl(run.history_file)
    total = sum(h["time"]["generate"] + h["time"]["score"] + h["time"]["update"] for h in history)
    assert evaluations[-1]["seconds"] == pytest.approx(total) and total > spent == pytest.approx(evaluations[1]["seconds"])


def test_resume_refuses_to_change_what_the_checkpoint_means(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", es={"generations": 1})
    run, _ = run_es(str(config), [])
    with pytest.raises(ConfigError, match="es.population"):
        run_es(None, ["es.population=4"], resume=str(run.root))


def test_non_empty_output_dir_is_refused_and_untouched(tiny_llama, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = write_config(tmp_path / "c.yaml", tiny_llama, out)
    with pytest.raises(RunDirError, match="--overwrite"):
        run_es(str(config), [])
    with pytest.raises(RunDirError, match="not an evolm run"):  # --overwrite replaces runs only
        run_es(str(config), [], overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_a_run_only_once_the_new_one_can_start(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", es={"generations": 1})
    old, _ = run_es(str(config), [])
    before = {p: p.read_bytes() for p in old.root.rglob("*") if p.is_file()}
    for bad in (f"model.name_or_path={tmp_path / 'missing-model'}", "space.target_modules=[nope]",
                "task.options.prompts=0"):  # bad model, bad targets, no data
        with pytest.raises(Exception) as err:
            run_es(str(config), [bad], overwrite=True)
        assert err.type.__name__ in ("ConfigError", "TaskError"), err.value
        assert {p: p.read_bytes() for p in old.root.rglob("*") if p.is_file()} == before, bad
    new, summary = run_es(str(config), ["es.generations=2"], overwrite=True)
    assert summary["generations"] == 2 and len(read_jsonl(new.history_file)) == 2


def test_resume_keeps_the_config_truthful(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", es={"generations": 2})
    run, _ = run_es(str(config), [])
    with pytest.raises(ConfigError, match="es.generations=1: this run has done 2 generations already"):
        run_es(None, ["es.generations=1"], resume=str(run.root))
    with pytest.raises(RunDirError, match="own config.yaml; drop '.*c.yaml'"):
        run_es(str(config), [], resume=str(run.root))
    with pytest.raises(RunDirError, match="drop output_dir"):
        run_es(None, [f"output_dir={tmp_path / 'elsewhere'}"], resume=str(run.root))
    assert yaml.safe_load(run.config_file.read_text())["es"]["generations"] == 2
    run_es(None, ["es.generations=3"], resume=str(run.root))
    assert yaml.safe_load(run.config_file.read_text())["es"]["generations"] == 3
    assert [r["changed"] for r in read_jsonl(run.resumes_file)] == [{"es.generations": [2, 3]}]


def test_bad_config_fails_before_anything_is_loaded(tmp_path):
    missing_model = tmp_path / "no-such-model"
    config = write_config(tmp_path / "c.yaml", missing_model, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        run_es(str(config), ["es.sigma=-0.1", "es.populaton=8"])
    message = str(err.value)
    assert "es.sigma" in message and "greater than 0" in message
    assert "unknown field 'es.populaton'" in message and "population" in message
    assert not (tmp_path / "run").exists()


def _cli(*args: str) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", "evolm.cli", *args], env


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(tiny_llama, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_llama, out, es={"generations": 400}, eval={"every": 0})
    cmd, env = _cli("es", str(config))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=default_sigint)
    history = out / "results" / "history.jsonl"
    deadline = time.time() + 120
    while len(read_jsonl(history)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final"] is None
    done = summary["generations"]
    assert 2 <= done < 400  # the stop may land between a generation's history line and its checkpoint
    assert len(read_jsonl(history)) == done
    assert f"the checkpoint at generation {done} is kept" in (out / "logs" / "run.log").read_text()
    # continue to a few generations past the stop; it must equal an uninterrupted run of that length
    target = done + 2
    cmd, env = _cli("es", "--resume", str(out), f"es.generations={target}")
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)
    ref, _ = run_es(str(config), [f"es.generations={target}", f"output_dir={tmp_path / 'ref'}"])
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(ref.adapter_dir / "adapter_model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)


def test_evaluate_samples_report_pass_at_k(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    run, _ = run_es(str(config), ["es.generations=1"])
    # a random tiny model writes an 'a' in a few % of its samples: 32 samples an example make some right
    options = EvalOptions(task=LETTER_TASK, max_new_tokens=12, temperature=1.0, samples=32)
    report = evaluate_adapter(run.adapter_dir, options, compare=True)
    assert report["samples"] == 32 and len(report["examples_detail"]) == 32 * report["examples"]
    rows = report["examples_detail"]
    for side in ("base", "adapter"):
        right = {r["index"] for r in rows if r[f"{side}_correct"]}
        metrics = report[f"{side}_metrics"]
        assert metrics["pass_at_32"] == len(right) / report["examples"]
        assert metrics["accuracy"] == sum(r[f"{side}_correct"] for r in rows) / len(rows)
    assert 0 < report["adapter_metrics"]["accuracy"] < report["adapter_metrics"]["pass_at_32"]
    assert sum(report["comparison"].values()) == report["examples"]  # compared per example, best of its samples
    with pytest.raises(ValueError, match="temperature above 0"):
        evaluate_adapter(run.adapter_dir, EvalOptions(task=LETTER_TASK, samples=2))


def test_evaluate_compare_reports_improvements(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    run, _ = run_es(str(config), [])
    cmd, env = _cli("evaluate", "--adapter", str(run.adapter_dir), "--task", LETTER_TASK, "--compare",
                    "--max-new-tokens", "12", "--output", str(tmp_path / "report.json"))
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["adapter_metrics"]["reward"] > report["base_metrics"]["reward"]
    assert report["comparison"]["improvements"] >= 1
    assert sum(report["comparison"].values()) == report["examples"]
    cmd, env = _cli("runs", "list", str(tmp_path))
    listing = subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert "run" in listing and "finished" in listing


def test_torchrun_processes_share_the_population_and_agree(tiny_llama, tmp_path):
    """Two CPU processes (gloo) each evaluate half the members; the run equals a one-process run."""
    single = write_config(tmp_path / "a.yaml", tiny_llama, tmp_path / "single", es={"generations": 3})
    run_a, _ = run_es(str(single), [])
    shared = write_config(tmp_path / "b.yaml", tiny_llama, tmp_path / "shared", es={"generations": 3})
    _, env = _cli()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "evolm.cli", "es", str(shared)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "shared" / "results" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [h["fitness"] for h in read_jsonl(run_a.history_file)] == [
        h["fitness"] for h in read_jsonl(tmp_path / "shared" / "results" / "history.jsonl")
    ]
    a = load_file(run_a.adapter_dir / "adapter_model.safetensors")
    b = load_file(tmp_path / "shared" / "adapter" / "adapter_model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)


def test_lora_defaults_move_a_small_model(tiny_llama, tmp_path):
    """The conciseness preset with space.kind=lora and its default σ and learning rate, 6 members: every
    member writes a completion of its own length (at σ = 0.01 half of them wrote alike), so the update is not
    zero and B leaves 0 (generation 0's B is 0: the base model)."""
    run, _ = run_es("conciseness", [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_llama}",
                                    "space.kind=lora", "es.population=6", "es.generations=2",
                                    "decoding.max_new_tokens=48", "eval.every=0", "export=false",
                                    "logging.progress=false", "logging.tensorboard=false", "task.train_size=2",
                                    "task.test_size=1"])
    history = read_jsonl(run.history_file)
    assert len(set(history[0]["fitness"])) == 6, history[0]["fitness"]
    params = torch.load(run.checkpoint_file, weights_only=True)["strategy"]["params"]
    assert all(p.abs().max() > 0 for name, p in params.items() if name.endswith("lora_B"))
