"""Selection and breeding: which variants survive, and the children that replace the rest."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from evolm.search.config import EvolutionConfig, SearchSpace
from evolm.search.genes import Genes, crossover, mutate, sample

TRIES = 200  # attempts at a configuration not seen before, before settling for one new to this generation


@dataclass(frozen=True)
class Member:
    """An evaluated variant, as selection sees it."""

    id: int
    genes: Genes
    fitness: float | None  # None: could not be scored; ranks last


@dataclass
class Plan:
    """A variant to create: its genes and lineage, and whose adapter weights it starts from."""

    genes: Genes
    origin: str  # initial | survivor | mutation | crossover
    parents: list[int] = field(default_factory=list)
    mutated: list[str] = field(default_factory=list)
    init_from: int | None = None


def generation_rng(seed: int, generation: int) -> random.Random:
    """The random stream that breeds `generation`; depends only on the run seed and the generation."""
    return random.Random(f"evolm-search:{seed}:{generation}")


def rank(members: list[Member]) -> list[Member]:
    """Best first; ties go to the older variant (lower id), unscored variants last."""
    return sorted(members, key=lambda m: (m.fitness is None, -(m.fitness or 0.0), m.id))


def initial_population(space: SearchSpace, size: int, rng: random.Random) -> list[Plan]:
    plans: list[Plan] = []
    taken: set[tuple] = set()
    for _ in range(size):
        genes = sample(space, rng)
        for _ in range(TRIES):
            if genes.key() not in taken:
                break
            genes = sample(space, rng)
        taken.add(genes.key())
        plans.append(Plan(genes, "initial"))
    return plans


def next_generation(members: list[Member], config: EvolutionConfig, space: SearchSpace,
                    rng: random.Random, seen: set[tuple]) -> list[Plan]:
    """keep_top survivors continue; each other slot is a child that is a crossover of two parents with
    probability crossover_rate (decided once per child, so the rate holds exactly in expectation),
    then mutated. A child repeats no configuration in `seen` (every earlier variant) if it can help
    it, and never one of this generation unless the space has run out."""
    ranked = rank(members)
    survivors = ranked[: config.keep_top]
    plans = [Plan(m.genes, "survivor", [m.id], [], m.id) for m in survivors]
    taken = {m.genes.key() for m in survivors}
    mates = ranked[: max(2, config.keep_top)]  # crossover needs two parents even when keep_top = 1
    for _ in range(config.population - config.keep_top):
        crossed = rng.random() < config.crossover_rate
        parents = rank(rng.sample(mates, 2)) if crossed else [rng.choice(survivors)]
        for attempt in range(2 * TRIES):
            genes = crossover(parents[0].genes, parents[1].genes, rng) if crossed else parents[0].genes
            genes, mutated = mutate(genes, space, config.mutation_rate, rng)
            avoid = taken | seen if attempt < TRIES else taken
            if genes.key() not in avoid:
                break
        taken.add(genes.key())
        plans.append(Plan(genes, "crossover" if crossed else "mutation", [p.id for p in parents], mutated,
                          _weights_donor(parents, genes).id))
    return plans


def _weights_donor(parents: list[Member], genes: Genes) -> Member:
    """The parent whose adapter fits the child best: same rank first, then the same module set,
    then the fitter parent."""
    return max(parents, key=lambda p: (p.genes.rank == genes.rank, p.genes.target_modules == genes.target_modules,
                                       -parents.index(p)))
