"""Every user mistake is one line on stderr, `error: …`, exit 2, and writes nothing; an internal
failure is one line naming the log with its traceback; Ctrl-C before the start says so (exit 130).

The cheap cases run the real `evolm` app in process (typer's runner); those that need a process of
their own (an offline hub, Ctrl-C, a full or read-only disk) run `python -m evolm.cli`. A full and a
read-only disk are real: a tiny or read-only tmpfs mounted in a user namespace (`unshare -rm`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model
from helpers import runs
from helpers.processes import default_sigint
from helpers.runs import LETTER_TASK
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import evolm as evolm_package
from evolm.cli import app
from evolm.es.runner import run_es
from evolm.models import weight_bytes

TESTS = Path(__file__).parent


def write_config(path: Path, model: Path, out: Path, **sections) -> Path:
    return runs.write_config(path, model, out, runs.SMALL_ES_RUN, **sections)


def evolm(*args: str) -> tuple[int, str]:
    """Exit code and stderr of the `evolm` app run in this process."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


def evolm_process(*args: str, wrap: list[str] | None = None, env: dict | None = None,
                  **popen) -> subprocess.Popen:
    command = [*(wrap or []), sys.executable, "-m", "evolm.cli", *args]
    source = str(Path(evolm_package.__file__).parents[1])  # the evolm under test, whatever the working folder
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), source]),
                       **(env or {}))
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finished(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    stderr = finished_with_stdout(process, timeout)[1]
    return process.returncode, stderr


def finished_with_stdout(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    return process.communicate(timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The `error:` line; there must be exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def config(tiny_llama, tmp_path) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    run, _ = run_es(str(write_config(root / "c.yaml", tiny_llama, root / "run")), [])
    return run.root


def user_mistakes(tmp_path: Path, config: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (arguments, a part of the message the one line must hold)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("es: {population: [1, 2\n")
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("mine")
    return {
        "missing model folder": ([f"model.name_or_path={tmp_path / 'no-model'}"],
                                 f"model {tmp_path / 'no-model'}: no such model folder"),
        "folder that is no model": ([f"model.name_or_path={not_a_model}"], "has no config.json"),
        "cuda without a GPU": (["model.device=cuda"], "model.device=cuda: this machine has no CUDA device"),
        "malformed YAML file": ([str(bad_yaml)], f"{bad_yaml}: not valid YAML (line 2, column 1"),
        "malformed YAML override": (["es.population=[1"], "override 'es.population=[1': the value is not valid YAML"),
        "layer the model lacks": (["space.layers=[7]"], "space.layers: the model has 2 decoder layers (0 to 1)"),
        "module the model lacks": (["space.target_modules=[qq_proj]"],
                                   "space.target_modules: the model has no linear module named qq_proj"),
        "empty data": (["task.options.prompts=0"], "the training split is empty"),
        "more prompts a generation than the data": (["task.options.prompts=5", "es.prompts_per_generation=6"],
                                                    "es.prompts_per_generation=6: the training split has 5 prompts"),
        "overwrite a folder that is no run": ([f"output_dir={not_a_model}", "--overwrite"],
                                              "is not an evolm run (no .evolm-run marker)"),
    }


def test_user_mistakes_are_one_line_exit_2_and_write_nothing(config, tmp_path):
    for case, (extra, expected) in user_mistakes(tmp_path, config).items():
        arguments = extra if extra[0].endswith(".yaml") else [str(config), *extra]
        code, stderr = evolm("es", *arguments)
        assert code == 2, (case, stderr)
        assert expected in one_error_line(stderr), (case, stderr)
        assert not (tmp_path / "run").exists(), case
    if importlib.util.find_spec("gguf") is not None:
        return  # the missing-package message below needs gguf absent
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # scoring a GGUF model needs no run folder, only the package
    code, stderr = evolm("evaluate", "--task", LETTER_TASK, "--model", str(tmp_path / "m.gguf"))
    assert code == 2 and "needs the gguf package: pip install 'evolm[gguf]'" in one_error_line(stderr)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not a checkpoint at all"],
                         ids=["empty", "truncated", "corrupted"])
def test_resume_from_an_unreadable_checkpoint(finished_run, tmp_path, content):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "latest.pt").write_bytes(content)
    code, stderr = evolm("es", "--resume", str(run), "es.generations=3")
    assert code == 2
    assert f"checkpoint {run / 'checkpoints' / 'latest.pt'} is unreadable" in one_error_line(stderr)


def test_resume_arguments_that_would_be_ignored_or_untrue(finished_run, config):
    history = (finished_run / "results" / "history.jsonl").read_text()
    for arguments, expected in ((["es.generations=1"], "es.generations=1: this run has done 2 generations already"),
                                ([str(config)], "--resume continues a run with its own config.yaml"),
                                (["output_dir=elsewhere"], "drop output_dir"),
                                (["--overwrite"], "give only one of them")):
        code, stderr = evolm("es", "--resume", str(finished_run), *arguments)
        assert code == 2 and expected in one_error_line(stderr), stderr
    assert yaml.safe_load((finished_run / "config.yaml").read_text())["es"]["generations"] == 2
    assert (finished_run / "results" / "history.jsonl").read_text() == history


def test_runs_list_of_a_missing_folder(tmp_path):
    code, stderr = evolm("runs", "list", str(tmp_path / "missing"))
    assert code == 2 and "is not a folder" in one_error_line(stderr)


def test_runs_list_shows_whole_paths_relative_to_the_root(finished_run):
    deep = finished_run.parent / ("a-rather-long-folder-name-for-runs" * 2) / "run-with-a-long-name-0001"
    shutil.copytree(finished_run, deep)
    result = CliRunner().invoke(app, ["runs", "list", str(finished_run.parent)], terminal_width=80)
    assert result.exit_code == 0 and str(deep.relative_to(finished_run.parent)) in result.stdout
    assert "last mean fitness" in result.stdout and "finished" in result.stdout, result.stdout  # no cut column


def test_boolean_flags_show_as_flags_in_help():
    for command in (["es", "--help"], ["search", "--help"], ["runs", "list", "--help"], ["--help"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0 and "<bool>" not in result.stdout, result.stdout


def test_help_keeps_bracketed_text_and_whole_sentences():
    grpo = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).stdout
    assert "(needs evolm[rl])" in grpo  # not taken for markup
    evaluate = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "300"}).stdout
    assert "PATH[a:b]" in evaluate and "both-wrong cases against the base (or B)" in evaluate, evaluate


def test_datasets_lists_every_hub_id_whole():
    result = CliRunner().invoke(app, ["datasets"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "Jiayi-Pan/Countdown-Tasks-3to4" in result.stdout, result.stdout


def test_a_finished_run_says_where_it_went_and_what_changed(config, tmp_path):
    result = CliRunner().invoke(app, ["es", str(config)])
    assert result.exit_code == 0, result.stderr
    line, = [line for line in result.stdout.splitlines() if line.startswith("done: ")]
    summary = json.loads((tmp_path / "run" / "results" / "summary.json").read_text())
    base, final = summary["base"], summary["final"]
    assert line.startswith(f"done: {tmp_path / 'run'}  test: reward {base['reward']:.4g} → {final['reward']:.4g}, ")
    assert re.search(rf"\(generation {final['generation']}, [0-9.,]+ training s\)$", line), line
    again = CliRunner().invoke(app, ["es", "--resume", str(tmp_path / "run")])
    assert again.exit_code == 0 and f"nothing to do: the run has done its {final['generation']} generations" \
        in again.stdout, again.stdout


def test_evaluate_names_a_missing_adapter_or_comparison_folder(tiny_llama, tmp_path):
    for flag, others in (("--adapter", []), ("--against", ["--model", str(tiny_llama)])):
        result = CliRunner().invoke(app, ["evaluate", flag, str(tmp_path / "nowhere"), "--task", "conciseness",
                                          *others], env={"COLUMNS": "300"})  # typer boxes usage errors: one line
        assert result.exit_code == 2, result.stderr
        assert f"'{flag}': path '{tmp_path / 'nowhere'}' does not exist" in result.stderr, result.stderr


def test_an_internal_error_is_one_line_with_the_log_of_its_traceback(config):
    code, stderr = evolm("es", str(config), "task.name=helpers.broken_task:BrokenTask")
    assert code == 1 and "Traceback" not in stderr
    line, = [line for line in stderr.splitlines() if line.startswith("internal error: ")]
    assert line.startswith("internal error: RuntimeError: a bug in the data loader (the traceback is in ")
    log = Path(line.split("the traceback is in ")[1].split(";")[0])
    assert "RuntimeError: a bug in the data loader" in log.read_text()
    log.unlink()


def test_an_error_raised_while_unwinding_from_ctrl_c_is_the_ctrl_c(config):
    code, stderr = evolm("es", str(config), "task.name=helpers.broken_task:CleanupFailsOnCtrlC")
    assert code == 130 and "interrupted before the run started" in stderr and "internal error" not in stderr, stderr


def test_a_refused_allocation_is_one_line_saying_what_to_lower(config):
    code, stderr = evolm("es", str(config), "task.name=helpers.broken_task:OutOfMemoryTask")
    assert code == 2 and "internal error" not in stderr, stderr
    line, = stderr.splitlines()
    assert line.startswith("error: out of memory: the host refused an allocation: you tried to allocate "
                           "35184372088832 bytes. Use a smaller model"), line


def test_the_weights_a_model_needs_count_shared_ones_once(tmp_path):
    """What `model … needs N GiB for its weights` says, for a model whose head is its embedding."""
    path = build_tiny_model(tmp_path / "tied", tied=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(str(path), {}, False, torch.bfloat16) == loaded
    assert loaded < sum(t.numel() * 2 for t in model.state_dict().values())  # the tied head counted once


def test_an_offline_hub_id_says_how_to_pass_a_local_folder(config, tmp_path):
    process = evolm_process("es", str(config), "model.name_or_path=nobody/no-such-model",
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    code, stderr = finished(process)
    assert code == 2
    line = one_error_line(stderr)
    assert "model nobody/no-such-model could not be loaded from the Hugging Face hub" in line
    assert "pass the folder: model.name_or_path=DIR" in line


def test_an_unreachable_hub_fails_at_the_first_connection_with_one_line(config, tmp_path):
    """No network (a hub address that refuses connections), nothing cached: one line at once, no retries."""
    process = evolm_process("es", str(config), "model.name_or_path=nobody/no-such-model",
                            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    code, stderr = finished(process)
    assert code == 2 and "Retry" not in stderr, stderr
    line = one_error_line(stderr)
    assert "model nobody/no-such-model could not be loaded from the Hugging Face hub" in line
    assert "(hf download nobody/no-such-model --local-dir DIR)" in line and "huggingface-cli" not in line


def assert_only_the_main_thread_takes_ctrl_c(pid: int) -> None:
    """Every thread of the process but its main one blocks SIGINT and SIGTERM (Linux's /proc says so), so the
    kernel delivers them to the main thread (the one a blocking read holds)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return  # no /proc here: nothing to look at
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    others = [t for t in tasks.iterdir() if t.name != str(pid)]
    assert others, "torch starts a thread at import: this check would look at nothing"
    for thread in others:
        blocked = next(int(line.split()[1], 16) for line in (thread / "status").read_text().splitlines()
                       if line.startswith("SigBlk:"))
        assert blocked & wanted == wanted, f"thread {thread.name} can take Ctrl-C or SIGTERM"


def test_ctrl_c_while_loading_keeps_the_old_run_and_says_nothing_started(finished_run, tmp_path):
    """The new run reads its data from a named pipe that never delivers, so Ctrl-C lands while loading."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    pipe = tmp_path / "data.jsonl"
    os.mkfifo(pipe)
    process = evolm_process("es", str(run / "config.yaml"), "task.name=conciseness", f"task.train={pipe}",
                            "--overwrite", preexec_fn=default_sigint)  # Ctrl-C arrives however pytest was started
    deadline = time.time() + 60
    while True:  # opening the write end succeeds once the run has opened the pipe to read its data
        try:
            writer = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.time() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
    assert_only_the_main_thread_takes_ctrl_c(process.pid)  # else the signal may land where it interrupts nothing
    process.send_signal(signal.SIGINT)
    code, stderr = finished(process)
    os.close(writer)
    assert code == 130, stderr
    assert "interrupted before the run started: nothing was written" in stderr and "Traceback" not in stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


AFTER = "--- after the run ---"


def namespace_with(mount_options: str, folder: Path) -> list[str]:
    """A command prefix that runs the rest with a tmpfs mounted on `folder` (a user namespace: unprivileged),
    then lists the temporary files left there and prints the run's summary (the mount ends with it)."""
    script = (f'mount -t tmpfs -o {mount_options} tmpfs "{folder}" && {{ "$@"; code=$?; echo "{AFTER}"; '
              f'find "{folder}" -name "*.tmp"; cat "{folder}/run/results/summary.json"; exit $code; }}')
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


def user_namespaces_work(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*namespace_with("size=4k", tmp_path), "true"], capture_output=True)
    return probe.returncode == 0


def test_a_read_only_output_folder(config, tmp_path):
    if not user_namespaces_work(tmp_path):
        pytest.skip("no unprivileged user namespaces here to mount a read-only folder")
    disk = tmp_path / "disk"
    disk.mkdir()
    process = evolm_process("es", str(config), f"output_dir={disk / 'run'}", wrap=namespace_with("ro", disk))
    code, stderr = finished(process)
    assert code == 2
    assert one_error_line(stderr) == (f"error: cannot write {disk / 'run'}: Read-only file system; the file system "
                                      "is read-only: set output_dir to a writable folder")


def test_a_full_disk_stops_the_run_with_one_line_and_no_temporary_file(config, tmp_path):
    if not user_namespaces_work(tmp_path):
        pytest.skip("no unprivileged user namespaces here to mount a small disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    process = evolm_process("es", str(config), f"output_dir={out}", "es.generations=100000",
                            wrap=namespace_with("size=48k", disk), cwd=tmp_path)
    stdout, stderr = finished_with_stdout(process, timeout=300)
    assert process.returncode == 2, stderr
    line = one_error_line(stderr)
    assert line.startswith(f"error: cannot write {out}/") and "No space left on device; the disk is full" in line
    temporary_files, _, summary = stdout.partition(AFTER)[2].strip().partition("{")
    assert temporary_files == ""
    summary = json.loads("{" + summary)
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert summary["resume_from"] >= 1


def test_evaluate_shows_progress_on_stderr(tiny_llama):
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_llama), "--task", LETTER_TASK,
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.stderr
    assert "generating (" in result.stderr and "4/4" in result.stderr
