"""Evaluation sets beside the test split, keeping the best θ, and `evolm evaluate` on several sets: a tiny
real model and the letter task (whose prompts a data file can give)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import build_tiny_model
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_es import LETTER_TASK, write_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evolm.cli import app
from evolm.config import ConfigError, ModelConfig, load_config
from evolm.engine import PopulationEngine
from evolm.engine.sampling import SamplingParams
from evolm.es.runner import export_run, run_es
from evolm.evaluation import EvalOptions, evaluate_adapter, load_data_sets
from evolm.models import eos_token_ids, load_model
from evolm.reports import evolution_figure
from evolm.runs import RunDirError, evaluations_by_set, read_jsonl
from evolm.scoring import render_all
from evolm.tasks import TaskError

NO_LETTER_TASK = "helpers.letter_task:NoLetterTask"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sets") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Bad", "Hi", "Name a fruit", "Zoo"]))
    return path


def sets_config(tmp_path: Path, model: Path, prompts: Path, out: str = "run", keep_best: str = "test",
                every: int = 2, **sections) -> Path:
    """Letter-task ES scored every `every` generations on the test split, `words` (3 prompts) and `plain`
    (the opposite task, so its best θ is the base model's), keeping the best θ on `keep_best`."""
    sets = {"words": f"{prompts}[0:3]", "plain": {"source": str(prompts), "task": NO_LETTER_TASK}}
    sections = {"es": {"generations": 4}, "eval": {"every": every, "sets": sets, "keep_best": keep_best}} | sections
    return write_config(tmp_path / f"{out}.yaml", model, tmp_path / out, **sections)


def first_best(rows: list[dict]) -> int:
    """The generation of the highest accuracy, the earliest of ties."""
    return max(rows, key=lambda r: (r["accuracy"], -r["generation"]))["generation"]


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


@pytest.fixture(scope="module")
def lora_run(tiny_llama, prompts_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-sets")
    run, summary = run_es(str(sets_config(tmp, tiny_llama, prompts_file)), [])
    return run, summary


def test_sets_are_recorded_under_their_names_at_the_evaluated_generations(lora_run):
    run, summary = lora_run
    by_set = evaluations_by_set(read_jsonl(run.evaluations_file))
    assert next(iter(by_set)) == "test"  # the test split first, then eval.sets
    assert {name: [r["generation"] for r in rows] for name, rows in by_set.items()} == {
        "test": [0, 2, 4], "words": [0, 2, 4], "plain": [0, 2, 4]}
    history = read_jsonl(run.history_file)
    assert set(history[1]["sets"]) == {"words", "plain"} and history[1]["test"]  # generation 1 ends at θ₂
    assert "sets" not in history[0]
    assert summary["sets"]["words"]["final"]["generation"] == 4 and summary["base"]["set"] == "test"
    assert (run.results / "completions_words_gen00000.jsonl").is_file()
    assert len(read_jsonl(run.results / "completions_words_gen00000.jsonl")) == 3
    events = EventAccumulator(str(run.logs / "tensorboard")).Reload()
    assert {"test/accuracy", "words/accuracy", "plain/reward"} <= set(events.Tags()["scalars"])
    labels = [line.get_label() for line in evolution_figure(run.root).axes[-1].get_lines()]
    assert sorted(labels) == ["plain accuracy", "test accuracy", "words accuracy"]


def test_final_sets_are_scored_at_the_base_and_the_end_only_and_analyze_compares_runs_per_example(
        tiny_llama, prompts_file, tmp_path):
    """eval.final_sets: scored at the base and the final θ (even when a due evaluation, here at the generation
    es.max_seconds stopped at, already scored the others), their completions kept; `evolm analyze` then
    sign-tests the runs per example from those files, and refuses to pair sets of different records."""
    full = sets_config(tmp_path, tiny_llama, prompts_file, out="full", every=1, es={"generations": 3},
                       eval={"every": 1, "sets": {"words": f"{prompts_file}[0:3]", "all": str(prompts_file)},
                             "final_sets": ["all"]})
    run, _ = run_es(str(full), [])
    by_set = {name: [r["generation"] for r in rows]
              for name, rows in evaluations_by_set(read_jsonl(run.evaluations_file)).items()}
    assert by_set == {"test": [0, 1, 2, 3], "words": [0, 1, 2, 3], "all": [0, 3]}
    assert [len(read_jsonl(run.results / f"completions_all_gen{g:05d}.jsonl")) for g in (0, 3)] == [4, 4]
    stopped, _ = run_es(str(full), ["output_dir=" + str(tmp_path / "stopped"), "es.max_seconds=1e-9"])
    by_set = {name: [r["generation"] for r in rows]
              for name, rows in evaluations_by_set(read_jsonl(stopped.evaluations_file)).items()}
    assert by_set == {"test": [0, 1], "words": [0, 1], "all": [0, 1]}  # generation 1: due, and the final
    assert (stopped.results / "completions_gen00001.jsonl").is_file()  # scored as the final: completions kept
    other, _ = run_es(str(full), ["output_dir=" + str(tmp_path / "other"), f"eval.sets.all={prompts_file}[1:]"])
    result = CliRunner().invoke(app, ["analyze", str(run.root), str(stopped.root), str(other.root),
                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "compare.md").read_text().split("Per example, at each run's final evaluation")[1]

    def outcomes(root, name, g):
        prefix = "completions" if name == "test" else f"completions_{name}"
        return [r["correct"] for r in read_jsonl(root / "results" / f"{prefix}_gen{g:05d}.jsonl")]

    first, second = outcomes(run.root, "all", 3), outcomes(stopped.root, "all", 1)
    up = sum(b and not a for a, b in zip(first, second))
    down = sum(a and not b for a, b in zip(first, second))
    both = sum(a and b for a, b in zip(first, second))
    assert f"| all | stopped against full | {up} | {down} | {both} | {4 - up - down - both} |" in table
    assert "| all | other against full | not the same records |" in table  # prompts [1:], not all four
    base, final = outcomes(run.root, "test", 0), outcomes(run.root, "test", 3)
    assert (f"| test | full | 3 | accuracy {sum(base) / len(base):.4g} → accuracy {sum(final) / len(final):.4g} | "
            f"{sum(b and not a for a, b in zip(base, final))} / {sum(a and not b for a, b in zip(base, final))} |"
            in table)
    with pytest.raises(ConfigError, match="eval.final_sets nope: not in eval.sets"):
        load_config(str(full), ["eval.final_sets=[nope]"])
    with pytest.raises(ConfigError, match="scored only at the end"):
        load_config(str(full), ["eval.keep_best=all"])


def test_runs_that_keep_every_evaluations_completions_compare_per_example_at_equal_training_time(
        tiny_llama, tmp_path):
    """eval.keep_completions=every: a completions file per evaluation, and analyze's equal-time table pairs the
    two runs' evaluations at the shortest run's clock per example."""
    sections = {"es": {"generations": 3}, "eval": {"every": 1, "keep_completions": "every"}}
    first, _ = run_es(str(write_config(tmp_path / "a.yaml", tiny_llama, tmp_path / "a", **sections)), [])
    second, _ = run_es(str(write_config(tmp_path / "b.yaml", tiny_llama, tmp_path / "b", **sections)),
                       ["seed=1"])
    assert sorted(p.name for p in first.results.glob("completions_gen*.jsonl")) == [
        f"completions_gen{g:05d}.jsonl" for g in range(4)]
    result = CliRunner().invoke(app, ["analyze", str(first.root), str(second.root), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "compare.md").read_text()
    equal_time = table.split("At equal training time")[1].split("Per example,")[0]
    steps = {line.split("|")[1].strip(): int(line.split("|")[6]) for line in equal_time.splitlines()
             if line.startswith("| a |") or line.startswith("| b |")}

    def correct(run, g):
        return [r["correct"] for r in read_jsonl(run.results / f"completions_gen{g:05d}.jsonl")]

    x, y = correct(first, steps["a"]), correct(second, steps["b"])
    up, down = sum(b and not a for a, b in zip(x, y)), sum(a and not b for a, b in zip(x, y))
    both = sum(a and b for a, b in zip(x, y))
    assert f"| b against a | {up} | {down} | {both} | {len(x) - up - down - both} |" in equal_time

    for path in second.results.glob("completions_gen*.jsonl"):  # gzipped by hand, as a committed run folder's are
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    result = CliRunner().invoke(app, ["analyze", str(first.root), str(second.root), "--out", str(tmp_path / "gz")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gz" / "compare.md").read_text() == table
    cut = second.results / "completions_gen00003.jsonl.gz"  # the final evaluation's: analyze reads it
    cut.write_bytes(cut.read_bytes()[:-9])
    with pytest.raises(RunDirError, match="not a whole gzip file"):
        read_jsonl(cut)
    result = CliRunner().invoke(app, ["analyze", str(first.root), str(second.root), "--out", str(tmp_path / "cut")])
    assert result.exit_code == 2 and "not a whole gzip file" in result.output  # the user's file, not our bug


def test_keep_best_saves_the_best_generation_and_export_best_rebuilds_it(tiny_llama, prompts_file, tmp_path):
    run, summary = run_es(str(sets_config(tmp_path, tiny_llama, prompts_file, every=1)), [])
    tests = evaluations_by_set(read_jsonl(run.evaluations_file))["test"]
    best = json.loads(run.best_file.read_text())
    assert best == summary["best"]
    assert best["generation"] == first_best(tests) and best["metric"] == "accuracy" and best["set"] == "test"
    assert 0 < best["generation"] < 4, "this run's best test accuracy comes mid-run (1.0 at generation 3)"
    rebuilt = export_run(run.root, tmp_path / "rebuilt", best=True)
    best_weights = run.root / "best/adapter/adapter_model.safetensors"
    assert tensors_equal(rebuilt / "adapter_model.safetensors", best_weights)
    assert not tensors_equal(run.adapter_dir / "adapter_model.safetensors", best_weights)


def test_resume_keeps_the_best_so_far(tiny_llama, prompts_file, tmp_path):
    """`plain` scores best at generation 0 and worse after; a resumed run that forgot that would take a later θ."""
    config = sets_config(tmp_path, tiny_llama, prompts_file, keep_best="plain", every=1, es={"generations": 2})
    run, first = run_es(str(config), [])
    assert first["best"]["generation"] == 0
    before = load_file(run.root / "best/adapter/adapter_model.safetensors")
    run, summary = run_es(None, ["es.generations=4"], resume=str(run.root))
    plain = evaluations_by_set(read_jsonl(run.evaluations_file))["plain"]
    assert [r["generation"] for r in plain] == [0, 1, 2, 3, 4] and max(r["accuracy"] for r in plain[2:]) < 1
    assert summary["best"] == first["best"] == json.loads(run.best_file.read_text())
    after = load_file(run.root / "best/adapter/adapter_model.safetensors")
    assert all(before[k].equal(after[k]) for k in before)


def test_full_space_best_is_the_replayed_generation(tiny_llama, prompts_file, tmp_path):
    full = {"space": {"kind": "full-lowrank", "rank": 1, "target_modules": ["q_proj", "v_proj"]},
            "es": {"generations": 3, "population": 4, "sigma": 0.03, "learning_rate": 0.03, "optimizer": "es"},
            "eval": {"every": 1, "sets": {"words": f"{prompts_file}[0:3]"}, "keep_best": "words"}}
    run, summary = run_es(str(sets_config(tmp_path, tiny_llama, prompts_file, **full)), [])
    generation = summary["best"]["generation"]
    assert generation == first_best(evaluations_by_set(read_jsonl(run.evaluations_file))["words"])
    assert 0 < generation < 3, "this run's best words accuracy comes mid-run: the replay path is taken"
    reference, _ = run_es(str(sets_config(tmp_path, tiny_llama, prompts_file, out="reference", **full)),
                          [f"es.generations={generation}"])
    weights = "model.safetensors"
    assert tensors_equal(run.root / "best/model" / weights, reference.root / "model" / weights)
    exported = CliRunner().invoke(app, ["export", str(run.root), str(tmp_path / "best-again"), "--best"])
    assert exported.exit_code == 0, exported.output
    assert tensors_equal(tmp_path / "best-again" / weights, reference.root / "model" / weights)
    exported = CliRunner().invoke(app, ["export", str(run.root), str(tmp_path / "at-g"), f"--generation={generation}"])
    assert exported.exit_code == 0, exported.output
    assert tensors_equal(tmp_path / "at-g" / weights, reference.root / "model" / weights)
    for wrong in (["--generation=4"], ["--generation=-1"], ["--generation=1", "--best"]):
        refused = CliRunner().invoke(app, ["export", str(run.root), str(tmp_path / "refused"), *wrong])
        assert refused.exit_code == 2 and not (tmp_path / "refused").exists(), (wrong, refused.output)


def test_evaluate_scores_each_data_set(tiny_llama, prompts_file, tmp_path):
    report_file = tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", str(tiny_llama), "--task", LETTER_TASK, "--data", str(prompts_file),
        "--data", f"head={prompts_file}[0:2]", "--max-new-tokens", "6", "--output", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert {name: r["examples"] for name, r in report["sets"].items()} == {"prompts": 4, "head": 2}
    assert "prompts" in result.output and "head" in result.output
    assert "adapter_metrics" not in report  # several sets: only under "sets"
    assert "tokens" in result.output


def mean_generated_tokens(model: Path, sets, options: EvalOptions) -> list[float]:
    """What the engine itself generates per completion for each set's prompts (k samples each) under the
    options' decoding."""
    loaded = load_model(ModelConfig(name_or_path=str(model), device="cpu"))
    engine = PopulationEngine(loaded.model, loaded.tokenizer, (), eos_token_ids=eos_token_ids(loaded.model,
                                                                                               loaded.tokenizer))
    params = SamplingParams(options.max_new_tokens, options.temperature, stop_strings=options.stop)
    found = [engine.generate(render_all(loaded.tokenizer, s.examples) * options.samples, None, params).tokens[0]
             for s in sets]
    return [sum(map(len, tokens)) / len(tokens) for tokens in found]


def test_evaluate_reports_each_models_mean_generated_tokens_and_seconds(tiny_llama, prompts_file, tmp_path):
    """Per set and scored model, the mean tokens the engine generated per completion (over all k samples,
    cut at the stop strings) and the seconds of that generation: for the base alone, base and adapter
    together (a fresh LoRA, B = 0, writes what the base writes), and two models loaded one after the other."""
    zero, other = tmp_path / "zero", build_tiny_model(tmp_path / "other", seed=3)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(zero)
    options = EvalOptions(task=LETTER_TASK, max_new_tokens=12, stop=["j", "y"], device="cpu", model=str(tiny_llama))
    sets = load_data_sets(options, {"all": str(prompts_file), "head": f"{prompts_file}[0:2]"})
    expected, expected_other = mean_generated_tokens(tiny_llama, sets, options), mean_generated_tokens(other, sets,
                                                                                                      options)
    assert all(0 < n < options.max_new_tokens for n in expected)  # the stops cut some completions short
    assert expected != expected_other  # so that each side of --against shows its own model's lengths
    alone = evaluate_adapter(None, options, sets=sets)["sets"]
    compared = evaluate_adapter(zero, options, compare=True, sets=sets)["sets"]
    against = evaluate_adapter(other, options, sets=sets, against=tiny_llama)["sets"]
    for data, base_tokens, other_tokens in zip(sets, expected, expected_other):
        together, both = compared[data.name], against[data.name]
        found = [alone[data.name]["adapter_metrics"], together["base_metrics"], together["adapter_metrics"],
                 both["against_metrics"], both["adapter_metrics"]]
        tokens = [base_tokens] * 4 + [other_tokens]
        assert [m["completion_tokens"] for m in found] == [pytest.approx(n) for n in tokens]
        assert all(m["generate_seconds"] > 0 for m in found)
        # base and adapter are two members of one generate call: its seconds are both's
        assert together["base_metrics"]["generate_seconds"] == together["adapter_metrics"]["generate_seconds"]
    sampled = replace(options, temperature=1.0, samples=3)
    report = evaluate_adapter(None, sampled, sets=sets[:1])
    assert report["adapter_metrics"]["completion_tokens"] == pytest.approx(
        mean_generated_tokens(tiny_llama, sets[:1], sampled)[0])


def test_evaluate_kl_is_zero_for_a_no_op_adapter_and_the_same_for_an_adapter_and_its_merged_model(
        tiny_llama, prompts_file, tmp_path):
    """KL(model ‖ base) along the model's own completions: 0 for a fresh LoRA (B = 0); for a random LoRA the
    adapter path (the adapter switched off as the reference) and its merged model folder beside the base
    agree; the base alone has nothing to measure."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "zero")
    moved = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    moved.save_pretrained(tmp_path / "adapter")
    moved.merge_and_unload().save_pretrained(tmp_path / "merged")
    load_model(ModelConfig(name_or_path=str(tiny_llama), device="cpu")).tokenizer.save_pretrained(tmp_path / "merged")
    options = EvalOptions(task=LETTER_TASK, max_new_tokens=8, device="cpu", model=str(tiny_llama), kl=True)
    sets = load_data_sets(options, {"all": str(prompts_file)})
    assert evaluate_adapter(tmp_path / "zero", options, sets=sets)["adapter_metrics"]["kl"] == 0.0
    adapter = evaluate_adapter(tmp_path / "adapter", options, sets=sets)["adapter_metrics"]
    merged = evaluate_adapter(tmp_path / "merged", options, sets=sets)["adapter_metrics"]
    assert adapter["kl"] > 0.01 and merged["kl"] == pytest.approx(adapter["kl"], rel=1e-3)
    assert merged["kl_per_token"] == pytest.approx(adapter["kl_per_token"], rel=1e-3)
    with pytest.raises(ValueError, match="--kl"):
        evaluate_adapter(None, options, sets=sets)
    shown = CliRunner().invoke(app, ["evaluate", "--adapter", str(tmp_path / "adapter"), "--model", str(tiny_llama),
                                     "--task", LETTER_TASK, "--data", str(prompts_file), "--max-new-tokens", "8",
                                     "--kl"])
    assert shown.exit_code == 0 and "KL to the base" in shown.output, shown.output


def test_a_bad_set_source_stops_with_one_line_naming_the_set(tiny_llama, prompts_file, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
                          eval={"sets": {"broken": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(TaskError) as raised:
        run_es(str(config), [])
    assert str(raised.value).startswith("eval.sets.broken: data file not found") and "\n" not in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the model loaded
    result = CliRunner().invoke(app, ["es", str(config), "--overwrite"])
    assert result.exit_code == 2 and result.output.startswith("error: eval.sets.broken: data file not found")
    evaluated = CliRunner().invoke(app, ["evaluate", "--model", str(tiny_llama), "--task", LETTER_TASK,
                                         "--data", f"odd={tmp_path / 'missing.jsonl'}"])
    assert evaluated.exit_code == 2 and "--data odd: data file not found" in evaluated.output
    with pytest.raises(ConfigError, match="eval.keep_best 'nope' is not an evaluation set; known: test, words"):
        load_config(str(config), ["eval.keep_best=nope", f"eval.sets={{words: {prompts_file}}}"])
    with pytest.raises(ConfigError, match="set name 'fitness'"):
        load_config(str(config), [f"eval.sets={{fitness: {prompts_file}}}"])
