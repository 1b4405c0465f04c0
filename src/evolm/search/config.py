"""The `evolm search` run configuration: search space, evolution, training and fitness settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from evolm.config import EvalSetsSection, RunConfig, Section

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


class SearchSpace(Section):
    """The values each hyperparameter (gene) may take; mutation steps move between neighbours."""

    ranks: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256], min_length=1)
    alpha_multipliers: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1,
                                           description="alpha = rank x multiplier")
    learning_rates: list[float] = Field(default_factory=lambda: [5e-5, 1e-4, 2e-4, 5e-4, 1e-3], min_length=1)
    learning_rate_bounds: tuple[float, float] = Field((1e-6, 1e-2),
                                                      description="scaled learning rates are clamped here")
    dropouts: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1], min_length=1)
    target_modules: dict[str, list[str]] = Field(
        default_factory=lambda: {"qv": ["q_proj", "v_proj"], "attention": ATTENTION, "all_linear": ATTENTION + MLP},
        min_length=1, description="named sets of module names to adapt",
    )
    epochs: list[int] = Field(default_factory=lambda: [1], min_length=1, description="training epochs per generation")

    @model_validator(mode="after")
    def _values(self) -> "SearchSpace":
        low, high = self.learning_rate_bounds
        if not 0 < low <= high:
            raise ValueError(f"space.learning_rate_bounds must satisfy 0 < low <= high (got {low}, {high})")
        if any(not low <= lr <= high for lr in self.learning_rates):
            raise ValueError(f"space.learning_rates must lie within space.learning_rate_bounds {[low, high]}")
        if any(r < 1 for r in self.ranks) or any(e < 1 for e in self.epochs):
            raise ValueError("space.ranks and space.epochs must be positive")
        if any(not 0 <= d < 1 for d in self.dropouts) or any(m <= 0 for m in self.alpha_multipliers):
            raise ValueError("space.dropouts must lie in [0, 1) and space.alpha_multipliers must be positive")
        if any(not modules for modules in self.target_modules.values()):
            raise ValueError("every space.target_modules set needs at least one module name")
        return self


class EvolutionConfig(Section):
    population: int = Field(6, ge=2)
    generations: int = Field(10, ge=1)
    keep_top: int = Field(2, ge=1, description="survivors per generation; they continue training")
    mutation_rate: float = Field(0.3, ge=0, le=1, description="chance that each hyperparameter of a child mutates")
    crossover_rate: float = Field(0.2, ge=0, le=1, description="chance that a child is a crossover of two parents")
    max_seconds: float | None = Field(None, gt=0, description="budget of the variants' training and scoring "
                                      "seconds, summed over workers: once spent, the generation in progress is "
                                      "the run's last, and the baseline and the test split follow as usual")

    @model_validator(mode="after")
    def _sizes(self) -> "EvolutionConfig":
        if self.keep_top >= self.population:
            raise ValueError(f"evolution.keep_top ({self.keep_top}) must be below evolution.population "
                             f"({self.population})")
        return self


class TrainingConfig(Section):
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="None = no clipping")
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(1024, ge=8, description="prompt + answer tokens; prompts are cut from the left")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per generation")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto",
                                                           description="auto = bf16 autocast on a GPU that has it")
    targets: Literal["reference", "self"] = Field(
        "reference", description="what variants learn: the task's reference answers, or the base model's own "
                                 "answers that the task scores correct (rejection sampling; for reference answers "
                                 "without the reasoning the model needs, e.g. gsm8k rows with the final number only)")
    self_samples: int = Field(4, ge=1, description="targets=self: answers sampled per question")
    self_temperature: float = Field(0.7, gt=0, description="targets=self: sampling temperature")
    refresh_targets_every: int | None = Field(
        None, ge=1, description="targets=self: every k generations resample the training targets from the best "
                                "variant so far (iterated rejection sampling); None = the base model's, once")


class FitnessConfig(Section):
    """fitness = accuracy_weight x accuracy - perplexity_weight x answer perplexity (accuracy is the
    mean reward for tasks without right answers)."""

    accuracy_weight: float = 1.0
    perplexity_weight: float = Field(0.01, description="0.01 = the LoRALab formula accuracy - perplexity/100")
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1, description="prompts per batched greedy generate call")


class SplitsConfig(Section):
    """Train, validation and test rows. The validation split (fitness, selection) is held out of task.train;
    so is the test split (task.test_size rows) unless task.test gives one. The test split is scored once, at
    the end, for the best variant, the base model and the baseline. Rows are assigned by a seeded shuffle
    and recorded in the run folder (splits.jsonl); a resumed run reuses them."""

    validation_size: int | None = Field(None, ge=1, description="rows for fitness and selection; None = a tenth "
                                        "of task.train's rows, at most 200")


# The baseline `baseline: default-lora` trains: the common LoRA recipe (r 16, alpha 32, lr 2e-4, dropout 0.05,
# the attention's query and value projections), for as many optimizer steps as the best variant's lineage took.
DEFAULT_LORA = {"rank": 16, "alpha_multiplier": 2.0, "learning_rate": 2e-4, "dropout": 0.05}
DEFAULT_LORA_MODULES = ["q_proj", "v_proj"]


class WorkerConfig(Section):
    stale_after_s: float = Field(1800, gt=0, description="a claimed variant with no heartbeat for this long is retried")
    poll_s: float = Field(5, gt=0, description="how often an idle worker looks for work")


class SearchRunConfig(RunConfig):
    output_dir: str = "runs/search"
    space: SearchSpace = Field(default_factory=SearchSpace)
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    baseline: Literal["none", "default-lora"] = Field(
        "none", description="default-lora: also train one LoRA of r=16, alpha=32, lr=2e-4, dropout 0.05 on "
                            "q_proj/v_proj for as many steps as the best variant's lineage took, and score it "
                            "on the test split beside the best variant and the base model")
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    eval: EvalSetsSection = Field(default_factory=EvalSetsSection,
                                  description="Sets the best variant and the base model are scored on at the end.")

    @model_validator(mode="after")
    def _refresh_needs_self_targets(self) -> "SearchRunConfig":
        if self.training.refresh_targets_every is not None and self.training.targets != "self":
            raise ValueError("training.refresh_targets_every resamples self-sampled targets: it needs "
                             "training.targets=self")
        return self


MODES = {  # test modes: (population, generations, training, validation and test examples)
    "quick": (2, 2, 120, 40, 40),
    "pipeline": (3, 2, 15, 15, 15),
}
# A pipeline test checks the machinery, so it writes small adapters and takes several optimizer
# steps (15 examples in batches of 8 x 2 would be one step, whose loss is the base model's).
PIPELINE_MAX_RANK = 8
PIPELINE_BATCH_SIZE = 4


def apply_mode(config: SearchRunConfig, mode: Literal["full", "quick", "pipeline"]) -> SearchRunConfig:
    """Shrink a run for --quick-test / --pipeline-test (the result is what config.yaml records)."""
    if mode == "full":
        return config
    population, generations, train_size, validation_size, test_size = MODES[mode]
    data = config.model_dump()
    data["evolution"].update(population=population, generations=generations,
                             keep_top=min(config.evolution.keep_top, population - 1))
    data["task"].update(train_size=train_size, test_size=test_size)
    data["splits"]["validation_size"] = validation_size
    if mode == "pipeline":
        data["fitness"]["max_new_tokens"] = min(config.fitness.max_new_tokens, 128)
        data["space"]["ranks"] = sorted({min(rank, PIPELINE_MAX_RANK) for rank in config.space.ranks})
        data["training"].update(batch_size=min(config.training.batch_size, PIPELINE_BATCH_SIZE),
                                gradient_accumulation=1)
    return SearchRunConfig.model_validate(data)
