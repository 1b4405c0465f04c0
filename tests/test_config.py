"""Configuration: presets, overrides and the messages users see for bad input."""

from __future__ import annotations

import copy
import math
import re

import pytest
import yaml

from evolm.config import (
    STEP_DEFAULTS,
    ConfigError,
    ESRunConfig,
    apply_overrides,
    dump_config,
    load_config,
    preset_names,
    validate,
)
from evolm.es.lora_space import LoRASpace
from evolm.search.config import SearchRunConfig


def test_presets_carry_the_paper_defaults():
    assert {"countdown", "conciseness"} <= set(preset_names())
    for name in ("countdown", "conciseness"):
        config = load_config(name)
        assert config.es.population == 30 and config.decoding.temperature == 0.0
        assert (config.space.kind, config.space.rank) == ("full-lowrank", 8)
        # the paper's step sizes, for noise of unit variance per weight
        assert (config.es.sigma, config.es.learning_rate) == STEP_DEFAULTS["full-lowrank"] == (0.001, 0.0005)
    assert (load_config("countdown", ["space.kind=full"]).es.sigma, STEP_DEFAULTS["full"]) == (0.001, (0.001, 0.0005))
    lora = load_config("countdown", ["space.kind=lora"])  # a rank-1 LoRA step moves a layer far less
    assert (lora.es.sigma, lora.es.learning_rate) == STEP_DEFAULTS["lora"] == (0.05, 0.025)
    assert load_config("countdown", ["space.kind=full", "es.sigma=0.002"]).es.sigma == 0.002
    assert load_config("countdown").decoding.max_new_tokens == 1024


@pytest.mark.parametrize("value", ["0", "-5", ".inf", "soon"])
def test_max_seconds_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match="es.max_seconds"):
        load_config("countdown", [f"es.max_seconds={value}"])
    assert load_config("countdown", ["es.max_seconds=1500"]).es.max_seconds == 1500


def test_the_decoding_section_is_still_read_under_its_old_name(tmp_path):
    """Configs and run folders written before `generation:` became `decoding:` load as they did."""
    old = tmp_path / "old.yaml"
    old.write_text("model: {name_or_path: m}\ntask: {name: countdown}\ngeneration: {max_new_tokens: 7, stop: []}\n")
    config = load_config(str(old))
    assert (config.decoding.max_new_tokens, config.decoding.stop) == (7, [])
    assert "generation" not in config.model_dump() and "decoding:" in dump_config(config)
    assert load_config(str(old), ["decoding.max_new_tokens=9"]).decoding.max_new_tokens == 9  # overrides win
    new = tmp_path / "new.yaml"
    new.write_text("model: {name_or_path: m}\ntask: {name: countdown}\ndecoding: {max_new_tokens: 7}\n")
    assert load_config(str(new), ["generation.temperature=0.5"]).decoding.temperature == 0.5  # the two merge
    with pytest.raises(ConfigError, match="give decoding.max_new_tokens only"):
        load_config(str(new), ["generation.max_new_tokens=9"])


def test_overrides_parse_yaml_values():
    config = load_config("countdown", ["es.population=8", "es.sigma=1e-2", "es.antithetic=false",
                                       "space.target_modules=[q_proj, v_proj]", "output_dir=runs/x"])
    assert config.es.population == 8 and config.es.sigma == 0.01 and config.es.antithetic is False
    assert config.space.target_modules == ["q_proj", "v_proj"] and config.output_dir == "runs/x"
    assert config.decoding.kv_cache_dtype == "model"  # exact unless asked
    assert load_config("countdown", ["decoding.kv_cache_dtype=fp8"]).decoding.kv_cache_dtype == "fp8"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("es.sigmaa=1", "unknown field 'es.sigmaa'; allowed: generations, population, sigma"),
        ("es.population=7", "even"),
        ("es.fitness=softmax", "es.fitness"),
        ("model.device=tpu", "model.device"),
        ("decoding.kv_cache_dtype=fp16", "decoding.kv_cache_dtype"),
        ("es.generations=many", "es.generations"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config("countdown", [override])


@pytest.mark.parametrize(
    "override", ["es.sigma=.inf", "es.learning_rate=.inf", "es.learning_rate=-.inf", "decoding.temperature=.nan",
                 "es.sigma=1e400", "es.adam_betas=[0.9, .nan]"],
)
def test_non_finite_numbers_are_rejected_naming_the_field(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}(\.\d)?: Input should be a finite number"):
        load_config("countdown", [override])


@pytest.mark.parametrize("key", ["es.learning_rate", "es.sigma"])
def test_a_step_or_noise_that_would_break_the_model_is_refused(key):
    """1e308 is finite in the config but infinite in θ's fp32 arithmetic; above 1 the model is noise."""
    for value in ("1e308", "1.5"):
        with pytest.raises(ConfigError, match=rf"{key}: Input should be less than or equal to 1"):
            load_config("countdown", [f"{key}={value}"])
    assert load_config("countdown", [f"{key}=1.0"]).model_dump()["es"][key.split(".")[1]] == 1.0


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """Nine nested lists of 9 aliases each expand to 9**10 strings: tens of GB, from 600 bytes."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 700
    with pytest.raises(ConfigError, match=r"bomb.yaml: .*line 2, column 8: YAML aliases \(\*a\) are not allowed"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config("countdown", ["task.options={a: &x 1, b: *x}"])


def _numeric_leaves(node, path=()):
    """Dotted paths (list items by index) of every number in a dumped config."""
    if isinstance(node, dict):
        return [leaf for key, child in node.items() for leaf in _numeric_leaves(child, (*path, key))]
    if isinstance(node, list):
        return [leaf for i, child in enumerate(node) for leaf in _numeric_leaves(child, (*path, i))]
    return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


@pytest.mark.parametrize("schema,source,presets", [(ESRunConfig, "countdown", "evolm.presets"),
                                                   (SearchRunConfig, "gsm8k", "evolm.presets.search")])
def test_no_numeric_field_of_either_schema_takes_inf_or_nan(schema, source, presets):
    data = yaml.safe_load(dump_config(load_config(source, ["model.name_or_path=x"], schema, presets)))
    leaves = _numeric_leaves(data)
    assert len(leaves) > 15
    for path in leaves:
        for bad in (math.inf, -math.inf, math.nan):
            broken = copy.deepcopy(data)
            parent = broken
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = bad
            with pytest.raises(ConfigError, match=re.escape(".".join(map(str, path)))):
                validate(broken, schema)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "c.yaml").write_text("task: {name: countdown}\n")
    with pytest.raises(ConfigError, match="missing required field 'model'"):
        load_config(str(tmp_path / "c.yaml"))


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_lora_space_layout_and_standard_init():
    space = LoRASpace({"b.proj": (8, 4), "a.proj": (6, 10)}, rank=2, alpha=4.0)
    theta = space.initial_params(seed=0)
    assert {n: tuple(t.shape) for n, t in theta.items()} == {
        "a.proj.lora_A": (2, 6), "a.proj.lora_B": (10, 2), "b.proj.lora_A": (2, 8), "b.proj.lora_B": (4, 2)}
    assert space.scale == 2.0
    weights = space.unflatten({n: t[None] for n, t in theta.items()})
    assert list(weights) == ["a.proj", "b.proj"]  # sorted, whatever the input order
    for name, (fan_in, _) in space.shapes.items():
        A, B = weights[name].A[0], weights[name].B[0]
        assert B.abs().sum() == 0  # generation 0 is the base model exactly
        assert A.abs().max() <= fan_in**-0.5 and A.abs().sum() > 0
    again, other_seed = space.initial_params(seed=0), space.initial_params(seed=1)
    assert all(again[n].equal(t) for n, t in theta.items())
    assert not other_seed["a.proj.lora_A"].equal(theta["a.proj.lora_A"])
    random_space = LoRASpace(space.shapes, rank=2, alpha=4.0, init="random")
    random_b = random_space.unflatten({n: t[None] for n, t in random_space.initial_params(0).items()})
    assert all(w.B.abs().sum() > 0 for w in random_b.values())
    restored = space.params_of({n: (w.A[0], w.B[0]) for n, w in weights.items()})
    assert all(restored[n].equal(t) for n, t in theta.items())


def test_schema_round_trip():
    config = load_config("conciseness")
    assert ESRunConfig.model_validate(config.model_dump()) == config
