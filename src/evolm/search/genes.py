"""Hyperparameters of one LoRA variant, and how they are sampled, mutated and crossed over."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

from evolm.search.config import SearchSpace

LR_FACTORS = (0.5, 0.8, 1.25, 2.0)


@dataclass(frozen=True)
class Genes:
    rank: int
    alpha_multiplier: float
    learning_rate: float
    dropout: float
    target_modules: str  # the name of a set in space.target_modules
    epochs: int

    @property
    def alpha(self) -> float:
        return self.rank * self.alpha_multiplier

    def key(self) -> tuple:
        """Identity for duplicate detection (learning rates equal to 4 significant digits are equal)."""
        return tuple(float(f"{v:.4g}") if isinstance(v, float) else v for v in asdict(self).values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Genes":
        return cls(**data)


GENE_NAMES = tuple(f.name for f in fields(Genes))


def choices(space: SearchSpace, gene: str) -> list:
    """The values a gene may take, in neighbour order (numbers ascending, module sets as written)."""
    if gene == "target_modules":
        return list(space.target_modules)
    plural = {"rank": "ranks", "alpha_multiplier": "alpha_multipliers", "learning_rate": "learning_rates",
              "dropout": "dropouts", "epochs": "epochs"}[gene]
    return sorted(set(getattr(space, plural)))


def sample(space: SearchSpace, rng: random.Random) -> Genes:
    return Genes(**{gene: rng.choice(choices(space, gene)) for gene in GENE_NAMES})


def mutate(genes: Genes, space: SearchSpace, rate: float, rng: random.Random) -> tuple[Genes, list[str]]:
    """Each gene mutates independently with probability `rate`: half the time a step to a neighbouring
    value, half the time a fresh value; the learning rate has a third, equally likely move, scaling
    by 0.5/0.8/1.25/2 (clamped to space.learning_rate_bounds). Returns the genes that changed."""
    values = genes.to_dict()
    changed = []
    for gene in GENE_NAMES:
        if rng.random() < rate:
            new = _mutate_gene(gene, values[gene], space, rng)
            if new != values[gene]:
                values[gene] = new
                changed.append(gene)
    return Genes(**values), changed


def _mutate_gene(gene: str, value: Any, space: SearchSpace, rng: random.Random) -> Any:
    options = choices(space, gene)
    move = rng.choice(("step", "fresh", "scale") if gene == "learning_rate" else ("step", "fresh"))
    if move == "scale":
        low, high = space.learning_rate_bounds
        return min(high, max(low, value * rng.choice(LR_FACTORS)))
    if move == "step":
        here = min(range(len(options)), key=lambda i: _distance(gene, options[i], value))
        neighbours = [options[i] for i in (here - 1, here + 1) if 0 <= i < len(options)]
        return rng.choice(neighbours) if neighbours else value
    others = [o for o in options if o != value]
    return rng.choice(others) if others else value


def _distance(gene: str, a: Any, b: Any) -> float:
    if gene == "target_modules":
        return float(a != b)
    return abs(math.log(a) - math.log(b)) if gene == "learning_rate" else abs(a - b)


def crossover(a: Genes, b: Genes, rng: random.Random) -> Genes:
    """Uniform crossover: every gene from either parent with equal chance."""
    first, second = a.to_dict(), b.to_dict()
    return Genes(**{gene: rng.choice((first[gene], second[gene])) for gene in GENE_NAMES})
