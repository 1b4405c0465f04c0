"""Run configuration: YAML presets + dotted overrides, validated before anything heavy happens."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evolm.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the user (field name and what is allowed)."""


class Section(BaseModel):
    # No field takes inf or nan: an infinite sigma or learning rate would only show up later as a NaN model.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = Field(description="Hub id or local folder of a transformers causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="e.g. sdpa or eager; None lets transformers pick.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be one of auto, cpu, cuda, cuda:N")


class TaskConfig(Section):
    name: str = Field(description="Built-in task name or 'package.module:Class'.")
    train: str | None = Field(None, description="Training data: path (optionally PATH[a:b]) or dataset id; None = built-in.")
    test: str | None = Field(None, description="Test data, same forms as train.")
    train_size: int | None = Field(None, ge=1, description="Keep at most this many training examples.")
    test_size: int | None = Field(None, ge=1, description="Keep at most this many test examples.")
    options: dict[str, Any] = Field(default_factory=dict, description="Task-specific keyword arguments.")


SpaceKind = Literal["lora", "full-lowrank", "full"]
# (sigma, learning_rate) by space kind. The full-weight spaces' noise has unit variance per weight, so the
# paper's values apply; a LoRA perturbation with B = 0 moves W only by sigma·eps_B·A (A ~ 1/sqrt(in)), so
# LoRA needs a larger sigma to change what the model writes at all: at 0.01 SmolLM2-135M's members wrote
# alike (zero gradient, B stayed 0) and its conciseness test reward fell; at 0.05 it rose (docs/results.md).
STEP_DEFAULTS: dict[str, tuple[float, float]] = {"lora": (0.05, 0.025), "full-lowrank": (0.001, 0.0005),
                                                 "full": (0.001, 0.0005)}


class SpaceConfig(Section):
    kind: SpaceKind = Field("lora", description="lora: a LoRA adapter evolves; full-lowrank: the weights, with "
                            "rank-r noise per member (EGGROLL); full: the weights, dense noise (the paper).")
    rank: int = Field(1, ge=1, le=1024, description="LoRA rank (lora) or the rank of each member's noise "
                      "(full-lowrank); unused by full.")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha (lora only).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    layers: list[int] | None = Field(None, description="Only these decoder layer indices; None = all.")
    init: Literal["standard", "random"] = Field(
        "standard", description="standard: A random, B zero (generation 0 = base model); random: both random."
    )


class ESConfig(Section):
    generations: int = Field(500, ge=0)
    population: int = Field(30, ge=2)
    # at most 1: weights are O(0.01-1), so a larger noise or step replaces the model by noise (and 1e308 is
    # infinite once θ's fp32 arithmetic meets it)
    sigma: float | None = Field(None, gt=0, le=1, description="None = the space kind's default (see STEP_DEFAULTS).")
    learning_rate: float | None = Field(None, gt=0, le=1, description="None = the space kind's default.")
    antithetic: bool = True
    fitness: Literal["zscore", "centered_rank", "raw"] = "zscore"
    optimizer: Literal["es", "adam"] = "es"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    prompts_per_generation: int | None = Field(None, ge=1, description="None = all training prompts every generation.")
    max_seconds: float | None = Field(None, gt=0, description="Stop after the generation in which training "
                                      "(evaluation excluded) reaches this many seconds, summed over resumes, as "
                                      "grpo.max_seconds; None = no limit.")

    @model_validator(mode="after")
    def _even_population(self) -> "ESConfig":
        if self.antithetic and self.population % 2:
            raise ValueError(f"es.population must be even with es.antithetic=true (got {self.population})")
        return self


class DecodingConfig(Section):
    """How θ writes completions, in training and in evaluation (the section was called `generation`)."""

    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | None = Field(None, description="Stop strings; None = the task's own (countdown: "
                                   "</answer>), [] = none.")
    max_batch_rows: int | None = Field(None, ge=1, description="Cap on rows decoded at once (KV slots); None = from the memory budget.")
    memory_fraction: float = Field(0.85, gt=0, le=1, description="Share of free accelerator memory a generation may use.")
    kv_cache_dtype: Literal["model", "fp8"] = Field("model", description="KV cache storage: the model's dtype "
                                                    "(exact), or fp8 (e4m3, scaled per head): half the KV bytes "
                                                    "and about twice the rows at once, inexact (it shortened and "
                                                    "worsened long reasoning on the H200: docs/benchmarks.md); "
                                                    "fused engine only.")


TEST_SET = "test"  # the name of a run's own test split among its evaluation sets
# names that TensorBoard tags of a run already use (fitness/mean, time/generate, speed/tokens_per_s)
RESERVEDSET_NAMES = (TEST_SET, "fitness", "time", "speed")
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EvalSetConfig(Section):
    """One extra evaluation set: its data, and optionally another task than the run's."""

    source: str | None = Field(None, description="Data source as task.test takes it (PATH, PATH[a:b], datasets "
                               "folder, hub id); None = the task's built-in test data.")
    size: int | None = Field(None, ge=1, description="Keep at most this many examples.")
    task: str | None = Field(None, description="Task name; None = the run's task (with its task.options).")
    options: dict[str, Any] | None = Field(None, description="Options of `task`; None = the run's task.options "
                                           "when the task is the run's, else none.")


class EvalSetsSection(Section):
    """Named evaluation sets beside the run's test split; a bare string is a source of the run's task."""

    sets: dict[str, EvalSetConfig] = Field(default_factory=dict, description="{name: source} or {name: {source, "
                                           "size, task, options}}.")

    @field_validator("sets", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: {"source": spec} if isinstance(spec, str) else spec for name, spec in value.items()}
        return value

    @field_validator("sets")
    @classmethod
    def _names(cls, value: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
        for name in value:
            if name in RESERVEDSET_NAMES or not SET_NAME.match(name):
                raise ValueError(f"set name {name!r} must be letters, digits, '_', '.', '-' and not one of "
                                 f"{', '.join(RESERVEDSET_NAMES)}")
        return value


class EvalConfig(EvalSetsSection):
    every: int = Field(10, ge=0, description="Evaluate θ on the test split and eval.sets every N generations (0 = "
                       "only base and final).")
    max_new_tokens: int | None = Field(None, ge=1, description="None = decoding.max_new_tokens.")
    final_sets: list[str] = Field(default_factory=list, description="Names of eval.sets scored only on the base "
                                  "and the final θ (e.g. a large test set the curve cannot afford), with their "
                                  "per-example completions kept in the run folder, so runs compare per example "
                                  "without their models (`evolm analyze`).")
    keep_completions: Literal["ends", "every"] = Field("ends", description="Whose completions the run folder "
                                                       "keeps per example (results/completions[_SET]_genG.jsonl): "
                                                       "the base's and the final θ's, or every evaluation's (runs "
                                                       "then compare per example at equal training time too; gzip "
                                                       "the files to keep a folder small, evolm reads either).")
    kl: bool = Field(False, description="Also report KL(θ ‖ base) on each set's prompts along θ's completions.")
    keep_best: str | None = Field(None, description="A set name or 'test': keep the θ that scored best on it "
                                  "(accuracy where the task gives verdicts, else mean reward) beside the last one.")

    @model_validator(mode="after")
    def _known_best_set(self) -> EvalConfig:
        if self.keep_best is not None and self.keep_best != TEST_SET and self.keep_best not in self.sets:
            known = ", ".join([TEST_SET, *self.sets])
            raise ValueError(f"eval.keep_best {self.keep_best!r} is not an evaluation set; known: {known}")
        unknown = [name for name in self.final_sets if name not in self.sets]
        if unknown:
            known = ", ".join(self.sets) or "none"
            raise ValueError(f"eval.final_sets {', '.join(unknown)}: not in eval.sets ({known})")
        if self.keep_best in self.final_sets:
            raise ValueError(f"eval.keep_best {self.keep_best!r} is scored only at the end (eval.final_sets): "
                             "nothing to pick a best θ from")
        return self


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "evolm"
    progress: bool = True


class RunConfig(Section):
    """What every run has, ES or search: where it writes, its seed, the model and the task."""

    output_dir: str
    seed: int = Field(0, ge=0, lt=2**31)
    model: ModelConfig
    task: TaskConfig

    @field_validator("output_dir")
    @classmethod
    def _home(cls, v: str) -> str:
        return str(Path(v).expanduser())  # output_dir=~/x is the home folder's x, not a folder named ~

    @model_validator(mode="after")
    def _trainable_model(self) -> "RunConfig":
        if self.model.name_or_path.endswith(".gguf"):
            raise ValueError(
                f"model.name_or_path={self.model.name_or_path}: a run exports and rebuilds against its base model, "
                "which must be a transformers model folder; dequantise the GGUF file once into one (python -c "
                "\"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; f='FILE.gguf'; "
                "M.from_pretrained('.', gguf_file=f).save_pretrained('DIR'); "
                "T.from_pretrained('.', gguf_file=f).save_pretrained('DIR')\") and pass model.name_or_path=DIR")
        return self


OLD_DECODING_NAME = "generation"  # the decoding section's name before "generation" meant only an ES iteration


class EngineRunConfig(RunConfig):
    """What `evolm es` and `evolm grpo` share beyond RunConfig: θ writes its completions through the population
    engine (decoding), is scored on the test split and eval.sets (eval), and the run reports as it goes."""

    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_decoding_name(cls, data: Any) -> Any:
        return with_decoding_renamed(data)


def with_decoding_renamed(data: Any) -> Any:
    """Configs and run folders written before the rename say `generation:`; read it as `decoding:` (both at
    once merge, and a field they set differently is refused)."""
    if not isinstance(data, dict) or OLD_DECODING_NAME not in data:
        return data
    data = dict(data)
    old, new = data.pop(OLD_DECODING_NAME), data.get("decoding")
    if isinstance(old, dict) and isinstance(new, dict):
        clash = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
        if clash:
            raise ValueError(f"{OLD_DECODING_NAME}.{clash[0]} and decoding.{clash[0]} differ; "
                             f"{OLD_DECODING_NAME} is decoding's old name: give decoding.{clash[0]} only")
        data["decoding"] = old | new
    elif new is None:
        data["decoding"] = old
    return data


class ESRunConfig(EngineRunConfig):
    output_dir: str = "runs/es"
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    es: ESConfig = Field(default_factory=ESConfig)
    export: bool = Field(True, description="Write the final adapter (lora) or model folder (full spaces) at the "
                         "end; `evolm export RUN DIR` writes it later from the small checkpoint.")

    @model_validator(mode="after")
    def _step_defaults(self) -> "ESRunConfig":
        sigma, learning_rate = STEP_DEFAULTS[self.space.kind]
        if self.es.sigma is None:
            self.es.sigma = sigma
        if self.es.learning_rate is None:
            self.es.learning_rate = learning_rate
        return self


Schema = TypeVar("Schema", bound=BaseModel)


ES_PRESETS = "evolm.presets"


def preset_names(package: str = ES_PRESETS) -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def read_source(source: str | Path, presets: str = ES_PRESETS) -> dict[str, Any]:
    """A YAML file path or the name of a built-in preset from the package `presets`, as a plain dict."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    elif str(source) in preset_names(presets):
        text = resources.files(presets).joinpath(f"{source}.yaml").read_text()
    else:
        names = ", ".join(preset_names(presets))
        raise ConfigError(f"'{source}' is neither a config file nor a preset; presets: {names}")
    data = parse_yaml(text, f"{source}: not valid YAML") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so 1e-3, true, [a, b] work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. es.population=8)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw, f"override '{item}': the value is not valid YAML "
                                     "(quote text that holds YAML signs)") if raw.strip() else None
    return data


def parse_yaml(text: str, what: str) -> Any:
    """YAML text as Python values; a syntax error is a ConfigError of one line saying where it is. Aliases
    (`*name`) are refused before anything is built: nested ones expand exponentially (a few hundred bytes
    can fill the memory), and a shared run folder's config.yaml is read too; evolm never writes them."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise ConfigError(f"{what} (line {mark.line + 1}, column {mark.column + 1}: YAML aliases "
                                  f"(*{event.anchor}) are not allowed; write the value out)")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} ({where}{problem})") from None


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        parent: Any = schema
        for part in error["loc"][:-1]:
            field = parent.model_fields.get(part) if isinstance(part, str) else None
            parent = field.annotation if field is not None else None
            if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
                parent = None
                break
        allowed = f"; allowed: {', '.join(parent.model_fields)}" if parent else ""
        return f"unknown field '{loc}'{allowed}"
    if error["type"] == "missing":
        return f"missing required field '{loc}'"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc or 'config'}: {error['msg']}{got_text}"


def validate(data: dict[str, Any], schema: type[Schema]) -> Schema:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, schema) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(
    source: str | Path,
    overrides: list[str] | None = None,
    schema: type[Schema] = ESRunConfig,  # type: ignore[assignment]
    presets: str = ES_PRESETS,
) -> Schema:
    data = read_source(source, presets)
    if "decoding" in schema.model_fields:  # an old file's section first, so that overrides of decoding.* apply to it
        data = with_decoding_renamed(data)
    return validate(apply_overrides(data, list(overrides or [])), schema)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
