"""The full-weight spaces on a tiny real model: the engine's member i is the model with W + σ·E_i written in,
`full` restores exactly, runs learn, resume and torchrun reproduce a run, the export is a transformers model."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file
from test_es import LETTER_TASK, _cli, write_config
from transformers import AutoModelForCausalLM

from evolm.config import ConfigError, ModelConfig
from evolm.engine import PopulationEngine, SamplingParams
from evolm.es.full_lowrank_space import FullLowRankSpace
from evolm.es.full_space import FullSpace
from evolm.es.runner import export_run, run_es
from evolm.es.strategy import EvolutionStrategy
from evolm.models import load_model, load_tokenizer
from evolm.runs import read_jsonl

PROMPTS = ["Hello there", "The quick brown fox", "1 + 1 =", "Once upon a time"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Settings under which both full-weight kinds learn the letter task on the tiny model: its weights have std 0.02,
# so σ is of that size, and 16 members give a usable gradient estimate within 16 generations.
LEARNS = {"generations": 16, "population": 16, "sigma": 0.03, "learning_rate": 0.05, "optimizer": "es"}


def _setup(model_path: Path, space_cls, backend: str = "transformers", **space_kwargs):
    tokenizer = load_tokenizer(str(model_path))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    engine = PopulationEngine(copy.deepcopy(base), tokenizer, TARGETS, eos_token_ids=[tokenizer.eos_token_id],
                              backend=backend)
    space = space_cls(engine, **space_kwargs)
    strategy = EvolutionStrategy(space.initial_params(0), population=4, sigma=0.05, learning_rate=0.02, seed=3,
                                 noise_rank=space.noise_rank)
    return tokenizer, base, engine, space, strategy


def _reference_generate(base, tokenizer, weights: dict[str, torch.Tensor], prompts, max_new_tokens):
    """Plain transformers generate of the model with these weights written into its linear layers."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=[])
        outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize("backend", ["transformers", "fused"])
@pytest.mark.parametrize("space_cls,kwargs", [(FullLowRankSpace, {"rank": 2}), (FullSpace, {})])
def test_member_i_is_the_model_with_w_plus_sigma_e_i(tiny_qwen, backend, space_cls, kwargs):
    tokenizer, base, engine, space, strategy = _setup(tiny_qwen, space_cls, backend, **kwargs)
    strategy.tell([0.3, -1.0, 2.0, 0.5])  # θ is no longer the base: the member sits on an evolved W
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    engine.eos_token_ids = [-1]  # every row runs to the limit, so every token is compared
    out = space.generate_population(strategy.ask(), [0, 1, 2, 3], prompts, SamplingParams(max_new_tokens=12))
    for member in (0, 1, 3):
        noise = strategy.ask().noise(member)
        if strategy.noise_rank:
            noise = {n: b @ a / math.sqrt(strategy.noise_rank) for n, (a, b) in noise.items()}
        weights = {n: strategy.params[n] + strategy.sigma * noise[n] for n in strategy.params}
        assert out.tokens[member] == _reference_generate(base, tokenizer, weights, prompts, 12), member
    assert out.tokens[0] != out.tokens[1]  # the perturbations matter


def test_full_restores_the_weights_bit_for_bit(tiny_llama):
    tokenizer, base, engine, space, strategy = _setup(tiny_llama, FullSpace)
    strategy.learning_rate = 0.0
    before = {n: lin.weight.detach().clone() for n, lin in space.linears.items()}
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    for _ in range(5):
        space.generate_population(strategy.ask(), range(4), prompts, SamplingParams(max_new_tokens=3))
        strategy.tell([1.0, 2.0, 0.0, 5.0])
    assert all(space.linears[n].weight.equal(w) for n, w in before.items())


@pytest.mark.parametrize("kind", ["full-lowrank", "full"])
def test_full_spaces_learn_and_export_a_transformers_model(tiny_llama, tmp_path, kind):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
                          space={"kind": kind, "rank": 4, "target_modules": TARGETS}, es=LEARNS)
    run, summary = run_es(str(config), [])
    history = read_jsonl(run.history_file)
    assert summary["final"]["reward"] > summary["base"]["reward"] + 0.05, summary
    assert sum(h["mean"] for h in history[-2:]) > sum(h["mean"] for h in history[:2])
    # dense noise is drawn and written per member, and its share of a generation is recorded
    assert all(("generate.noise" in h["time"]) == (kind == "full") for h in history)
    checkpoint = torch.load(run.checkpoint_file, weights_only=False)["strategy"]
    assert "params" not in checkpoint and len(checkpoint["fitness_log"]) == LEARNS["generations"]  # the log, not the weights
    assert run.checkpoint_file.stat().st_size < 100_000
    evolved = AutoModelForCausalLM.from_pretrained(run.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    changed = [n for n, p in evolved.named_parameters() if not p.equal(base.get_parameter(n))]
    assert changed and all(n.rsplit(".", 2)[-2] in TARGETS for n in changed)
    # the small run folder rebuilds the same model, also where the base model lives elsewhere now
    export_run(run.root, tmp_path / "rebuilt", model=str(shutil.copytree(tiny_llama, tmp_path / "moved")))
    assert _same_weights(run.model_dir, tmp_path / "rebuilt")
    assert json.loads((run.model_dir / "evolm.json").read_text())["base_model"] == str(tiny_llama)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_full_lowrank_resume_is_bit_identical(tiny_llama, tmp_path):
    space = {"kind": "full-lowrank", "rank": 2, "target_modules": TARGETS}
    es = {"sigma": 0.02, "learning_rate": 0.01, "optimizer": "adam"}
    straight = write_config(tmp_path / "a.yaml", tiny_llama, tmp_path / "straight", space=space,
                            es=es | {"generations": 4})
    run_a, _ = run_es(str(straight), [])
    stopped = write_config(tmp_path / "b.yaml", tiny_llama, tmp_path / "stopped", space=space,
                           es=es | {"generations": 2})
    run_b, _ = run_es(str(stopped), [])
    run_b, _ = run_es(None, ["es.generations=4"], resume=str(run_b.root))
    assert [h["fitness"] for h in read_jsonl(run_a.history_file)] == [
        h["fitness"] for h in read_jsonl(run_b.history_file)]
    assert _same_weights(run_a.model_dir, run_b.model_dir)


def test_resume_of_a_replayed_run_refuses_to_change_what_tell_reads(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", es={"generations": 1},
                          space={"kind": "full-lowrank", "rank": 2, "target_modules": TARGETS})
    run, _ = run_es(str(config), [])
    for override in ("es.sigma=0.5", "es.learning_rate=0.5", "es.fitness=raw", "es.weight_decay=0.1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):  # the replay would rebuild other weights
            run_es(None, [override, "es.generations=2"], resume=str(run.root))
    lora = write_config(tmp_path / "l.yaml", tiny_llama, tmp_path / "lora", es={"generations": 1})
    lora_run, _ = run_es(str(lora), [])
    _, summary = run_es(None, ["es.learning_rate=0.5", "es.generations=2"], resume=str(lora_run.root))
    assert summary["generations"] == 2  # θ is stored for lora: its step size may change


def test_evaluate_compares_an_evolved_model_folder_with_its_base(tiny_llama, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
                          space={"kind": "full-lowrank", "rank": 4, "target_modules": TARGETS}, es=LEARNS)
    run, _ = run_es(str(config), [])
    cmd, env = _cli("evaluate", "--adapter", str(run.root), "--task", LETTER_TASK, "--compare",
                    "--output", str(tmp_path / "report.json"))
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run's settings: max_new_tokens=12" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "model" and report["model"] == str(tiny_llama)
    assert report["adapter_metrics"]["reward"] > report["base_metrics"]["reward"]
    assert sum(report["comparison"].values()) == report["examples"] and report["sign_test_p"] is not None


def test_torchrun_reproduces_a_full_lowrank_run(tiny_llama, tmp_path):
    space = {"kind": "full-lowrank", "rank": 2, "target_modules": TARGETS}
    es = {"generations": 2, "sigma": 0.02, "learning_rate": 0.01}
    run_a, _ = run_es(str(write_config(tmp_path / "a.yaml", tiny_llama, tmp_path / "single", space=space, es=es)),
                      [])
    shared = write_config(tmp_path / "b.yaml", tiny_llama, tmp_path / "shared", space=space, es=es)
    _, env = _cli()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
           "-m", "evolm.cli", "es", str(shared)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [h["fitness"] for h in read_jsonl(run_a.history_file)] == [
        h["fitness"] for h in read_jsonl(tmp_path / "shared" / "results" / "history.jsonl")]
    assert _same_weights(run_a.model_dir, tmp_path / "shared" / "model")


def test_an_exported_model_is_in_the_base_dtype_with_tied_weights_written_once(tmp_path):
    """A bf16 base with a tied lm_head (as SmolLM2), run in fp32 on the CPU: the export is bf16 and as small
    as the base, and transformers loads it with the lm_head tied again."""
    base = build_tiny_model(tmp_path / "base", tied=True, dtype=torch.bfloat16)
    loaded = load_model(ModelConfig(name_or_path=str(base), device="cpu"))
    assert loaded.dtype == torch.float32
    engine = PopulationEngine(loaded.model, loaded.tokenizer, ["q_proj"], None, eos_token_ids=[3])
    space = FullLowRankSpace(engine, 2)
    params = {n: p + 0.01 for n, p in space.initial_params(0).items()}
    out = space.export(params, tmp_path / "out", str(base))
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size <= (base / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    name = next(iter(params))
    assert torch.equal(model.get_submodule(name).weight, params[name].to(torch.bfloat16))

