"""`evolm grpo`'s configuration: the sections it shares with `evolm es`, and its own `grpo` section.

Defaults are TRL's (GRPOConfig, TrainingArguments) where TRL has one; the README's table says which.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evolm.config import (
    ES_PRESETS,
    ConfigError,
    EngineRunConfig,
    Section,
    SpaceConfig,
    apply_overrides,
    preset_names,
    read_source,
    validate,
    with_decoding_renamed,
)

# What a preset of `evolm es` holds that only ES reads: `evolm grpo PRESET` drops these and keeps the rest
# (seed, model, task, decoding, eval, logging), so both commands train on one task definition.
ES_ONLY_SECTIONS = ("space", "es", "export")
# GRPOConfig fields evolm sets itself from its own sections; grpo.trl may not set them behind its back.
OWNED_TRL_FIELDS = ("output_dir", "max_steps", "learning_rate", "beta", "num_generations", "loss_type",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "temperature",
                    "top_p", "max_completion_length", "seed", "save_steps", "save_strategy", "logging_steps",
                    "report_to", "lr_scheduler_type", "bf16", "fp16", "steps_per_generation",
                    "generation_batch_size", "save_total_limit", "scale_rewards", "use_cpu")


class GRPOSpaceConfig(Section):
    kind: Literal["full", "lora"] = Field("full", description="full: the target matrices themselves train (no "
                                          "peft_config, as TRL defaults to; norms and embeddings stay, as in evolm "
                                          "es full); lora: a LoRA adapter on them through peft.")
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank (peft's default 8); lora only.")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (peft's default 8); lora only.")
    target_modules: list[str] = Field(default_factory=SpaceConfig.model_fields["target_modules"].default_factory,
                                      min_length=1, description="The linear modules that train (evolm es's default: all).")
    layers: list[int] | None = Field(None, description="Only these decoder layers; None = all.")


class GRPOSection(Section):
    steps: int = Field(500, ge=0, description="Optimizer steps (TrainingArguments.max_steps).")
    max_seconds: float | None = Field(None, gt=0, description="Stop once training (evaluation excluded) has run "
                                      "this long, summed over resumes; None = no limit.")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (TRL's default).")
    lr_scheduler: str = Field("linear", description="TrainingArguments.lr_scheduler_type (its default: linear "
                              "decay to 0 at `steps`).")
    beta: float = Field(0.0, ge=0, description="KL coefficient (TRL's default 0: no reference model).")
    group_size: int = Field(8, ge=2, description="Completions per prompt (TRL's num_generations).")
    prompts_per_step: int = Field(1, ge=1, description="Prompts per optimizer step; TRL's default batch (8 "
                                  "completions per device) holds one group of 8, i.e. 1 prompt.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step (a step's completions "
                                             "are split into this many backward passes).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (TrainingArguments' default; 0 = off).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of training completions (TRL's "
                               "default); evaluation decodes as `decoding` says (greedy by default).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of training completions (TRL's default).")
    save_every: int = Field(10, ge=1, description="Steps between checkpoints (the last one is kept).")
    max_skipped_updates: int = Field(3, ge=0, description="A step whose gradients are not finite is skipped, not "
                                     "applied (as AMP's GradScaler skips one: TRL would step AdamW into NaN "
                                     "weights); after more than this many skipped in a row the run stops as "
                                     "diverged, keeping the last finite θ.")
    space: GRPOSpaceConfig = Field(default_factory=GRPOSpaceConfig)
    trl: dict[str, Any] = Field(default_factory=dict, description="Further GRPOConfig fields, passed as given "
                                "(e.g. epsilon, num_iterations, gradient_checkpointing).")

    @field_validator("trl")
    @classmethod
    def _known_trl_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        from trl import GRPOConfig

        known = {f.name for f in fields(GRPOConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not GRPOConfig fields of the installed trl")
        owned = sorted(set(value) & set(OWNED_TRL_FIELDS))
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by evolm from its own fields (grpo.*, decoding.*, seed); "
                             "set those instead")
        return value

    @model_validator(mode="after")
    def _whole_groups_per_micro_batch(self) -> GRPOSection:
        completions = self.prompts_per_step * self.group_size
        if completions % self.gradient_accumulation_steps:
            raise ValueError(f"grpo.prompts_per_step × grpo.group_size = {completions} completions per step must "
                             f"divide into grpo.gradient_accumulation_steps={self.gradient_accumulation_steps} "
                             "micro-batches")
        return self


class GRPORunConfig(EngineRunConfig):
    output_dir: str = "runs/grpo"
    grpo: GRPOSection = Field(default_factory=GRPOSection)

    @model_validator(mode="after")
    def _best_needs_lora(self) -> GRPORunConfig:
        if self.eval.keep_best is not None and self.grpo.space.kind != "lora":
            raise ValueError("eval.keep_best needs grpo.space.kind=lora in a grpo run (a full model per "
                             "improvement would be written out)")
        return self


def read_grpo_source(source: str) -> dict[str, Any]:
    """A YAML file as it is, or an `evolm es` preset without its ES-only sections, writing to runs/NAME-grpo."""
    data = read_source(source)
    if source in preset_names(ES_PRESETS) and not Path(source).exists():
        data = {key: value for key, value in data.items() if key not in ES_ONLY_SECTIONS}
        data["output_dir"] = f"runs/{source}-grpo"
    return data


def load_grpo_config(source: str, overrides: list[str]) -> GRPORunConfig:
    try:
        import trl  # noqa: F401  (the grpo section checks its fields against GRPOConfig)
    except ImportError:
        raise ConfigError("evolm grpo needs TRL: pip install 'evolm[rl]'") from None
    return validate(apply_overrides(with_decoding_renamed(read_grpo_source(source)), overrides), GRPORunConfig)
