"""A run survives what users and shared run folders do to it: a second writer, damaged or crafted
files, a reward that never varies, a step that breaks θ, bad prompts, odd custom tasks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import runs
from helpers.letter_task import LetterTask

import evolm
from evolm.config import ConfigError, load_config
from evolm.es.lora_space import LoRASpace
from evolm.es.runner import run_es
from evolm.runs import RunDir, RunDirError, list_runs
from evolm.tasks import Example, TaskError, load_task

SAFETY_RUN = runs.SMALL_ES_RUN | {"es": runs.SMALL_ES_RUN["es"] | {"sigma": 0.5, "learning_rate": 0.5}}


def write_config(path: Path, model: Path, out: Path, **sections) -> Path:
    return runs.write_config(path, model, out, SAFETY_RUN, **sections)


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory) -> Path:
    """A finished 2-generation lora run; tests copy it before they change it."""
    root = tmp_path_factory.mktemp("finished")
    run, _ = run_es(str(write_config(root / "c.yaml", tiny_llama, root / "run")), [])
    return run.root


def copy_of(run: Path, tmp_path: Path) -> RunDir:
    subprocess.run(["cp", "-a", str(run), str(tmp_path / "run")], check=True)
    return RunDir(tmp_path / "run")


def test_a_second_writer_of_a_run_is_refused_with_one_line(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    code = (f"import time; from evolm.runs import RunDir\nwith RunDir({str(run.root)!r}).lock():\n"
            "    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(evolm.__file__).parents[1])))
    try:
        assert holder.stdout.readline().strip() == "held"
        history = run.history_file.read_text()
        with pytest.raises(RunDirError, match=rf"in use by another process \(pid {holder.pid}\)"):
            run_es(None, ["es.generations=3"], resume=str(run.root))
        assert run.history_file.read_text() == history and not run.resumes_file.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_resumed_config_with_yaml_aliases_is_refused(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    run.config_file.write_text("anchor: &a [1, 2]\n" + run.config_file.read_text() + "copy: *a\n")
    with pytest.raises(ConfigError, match="YAML aliases"):
        run_es(None, [], resume=str(run.root))


@pytest.mark.parametrize("damage", [b"", b'{"generation": 1, "fitness": [1]}\n'], ids=["zero bytes", "a line lost"])
def test_resume_refuses_a_history_that_lost_generations(finished, tmp_path, damage):
    run = copy_of(finished, tmp_path)
    run.history_file.write_bytes(damage)
    with pytest.raises(RunDirError, match=r"history.jsonl holds (0|1) of the 2 generations"):
        run_es(None, ["es.generations=3"], resume=str(run.root))
    assert run.history_file.read_bytes() == damage


def test_a_run_in_which_every_member_scores_the_same_warns(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", task={"name": "helpers.odd_tasks:ConstantTask"})
    run, summary = run_es(str(config), ["es.generations=3"])
    assert summary["status"] == "finished"
    assert len(summary["warnings"]) == 1 and "every member scored 1 in generations 0 to 2" in summary["warnings"][0]
    assert "nothing is learned" in (run.logs / "run.log").read_text()


def test_a_non_finite_theta_says_how_to_continue_and_names_the_checkpoint_that_exists(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    state = torch.load(run.checkpoint_file, weights_only=True)
    name = sorted(state["strategy"]["params"])[0]
    state["strategy"]["params"][name][0, 0] = float("inf")
    torch.save(state, run.checkpoint_file)
    with pytest.raises(FloatingPointError) as caught:
        run_es(None, ["es.generations=3"], resume=str(run.root))
    assert (f"continue from the checkpoint of generation 2 with a smaller es.learning_rate or es.sigma: "
            f"evolm es --resume {run.root} es.learning_rate=") in str(caught.value)
    summary = json.loads(run.summary_file.read_text())
    assert summary["status"] == "failed" and summary["resume_from"] == 2
    assert torch.load(run.checkpoint_file, weights_only=True)["strategy"]["generation"] == 2


def test_a_failure_at_the_final_export_is_recorded_as_failed(tiny_llama, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):  # the disk fills while the adapter is written
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "adapter"))

    monkeypatch.setattr(LoRASpace, "export", full_disk)
    with pytest.raises(OSError):
        run_es(str(write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")), [])
    summary = json.loads((tmp_path / "run" / "results" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"] and summary["resume_from"] == 2
    assert [r["status"] for r in list_runs(tmp_path)] == ["failed"]


@pytest.mark.parametrize("prompt,message", [("", "record 1 has an empty prompt"),
                                            ("a" * 600, "record 1's prompt is 600 tokens, and the model's context "
                                                        "is 512")], ids=["empty", "longer than the context"])
def test_a_bad_prompt_is_refused_naming_its_record(tiny_llama, tmp_path, prompt, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hello", prompt, "Go"]))
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    with pytest.raises(TaskError, match=f"the training split: {message}"):
        run_es(str(config), [f"task.train={data}"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task,message", [
    ("helpers.odd_tasks:TextScoreTask", "task 'text-score': score() must return a Score or a number, but for "
                                        "example 0 it returned str 'good'"),
    ("helpers.odd_tasks:NoScoreTask", "task 'no-score': score() must return a Score or a number, but for example 0 "
                                      "it returned NoneType None"),
])
def test_a_custom_score_that_is_no_number_is_a_task_error_naming_the_task(task, message):
    with pytest.raises(TaskError) as caught:
        load_task(task).checked_score("abc", Example("x"), 0)
    assert str(caught.value) == message


def test_a_custom_task_whose_init_raises_is_a_task_error_naming_the_task():
    with pytest.raises(TaskError, match=r"task 'helpers.odd_tasks:FailingInitTask': creating it raised KeyError: "
                                        "'API_TOKEN'"):
        load_task("helpers.odd_tasks:FailingInitTask")
    assert isinstance(load_task("helpers.letter_task:LetterTask"), LetterTask)


def test_output_dir_under_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config("conciseness", ["output_dir=~/runs/x"])
    assert config.output_dir == str(tmp_path / "runs" / "x")


def test_a_gguf_model_is_refused_before_a_run_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"a run exports and rebuilds against its base model, which must be a "
                                          r"transformers model folder; dequantise"):
        load_config("conciseness", [f"model.name_or_path={tmp_path / 'm.gguf'}"])
