"""Search space, mutation, crossover, selection, lineage and duplicate avoidance of `evolm search`."""

from __future__ import annotations

import random

import pytest

from evolm.config import ConfigError, load_config, preset_names
from evolm.search.config import EvolutionConfig, SearchRunConfig, SearchSpace, apply_mode
from evolm.search.evolution import Member, generation_rng, initial_population, next_generation, rank
from evolm.search.genes import Genes, choices, crossover, mutate, sample

SPACE = SearchSpace()


def population(n: int, seed: int = 0) -> list[Member]:
    rng = random.Random(seed)
    plans = initial_population(SPACE, n, rng)
    return [Member(i + 1, p.genes, rng.random()) for i, p in enumerate(plans)]


def test_mutation_changes_each_gene_at_the_configured_rate():
    rng = random.Random(1)
    genes = Genes(64, 1.0, 2e-4, 0.05, "attention", 1)
    trials = 4000
    counts = {"rank": 0, "dropout": 0, "target_modules": 0}
    for _ in range(trials):
        _, changed = mutate(genes, SPACE, 0.3, rng)
        for gene in counts:
            counts[gene] += gene in changed
    for gene, count in counts.items():  # these genes always move when they mutate: rate 0.3 exactly
        assert abs(count / trials - 0.3) < 4 * (0.3 * 0.7 / trials) ** 0.5, gene


def test_mutation_steps_to_neighbours_half_the_time_and_clamps_learning_rates():
    rng = random.Random(2)
    genes = Genes(64, 1.0, 1e-2, 0.05, "attention", 1)
    ranks, rates = [], []
    for _ in range(4000):
        child, _ = mutate(genes, SPACE, 1.0, rng)
        ranks.append(child.rank)
        rates.append(child.learning_rate)
    neighbours = sum(r in (32, 128) for r in ranks) / len(ranks)
    assert abs(neighbours - 0.75) < 0.04  # step (1/2) + fresh value that happens to be a neighbour (1/2 x 2/4)
    assert max(rates) <= SPACE.learning_rate_bounds[1]
    assert any(r not in SPACE.learning_rates for r in rates)  # scaled by 0.5 / 0.8 from the bound
    assert all(SPACE.learning_rate_bounds[0] <= r for r in rates)


def test_mutated_values_stay_in_the_space():
    rng = random.Random(3)
    genes = sample(SPACE, rng)
    for _ in range(500):
        genes, _ = mutate(genes, SPACE, 0.5, rng)
        for gene in ("rank", "alpha_multiplier", "dropout", "target_modules", "epochs"):
            assert getattr(genes, gene) in choices(SPACE, gene)


def test_crossover_takes_every_gene_from_a_parent():
    rng = random.Random(4)
    a, b = Genes(16, 0.5, 5e-5, 0.0, "qv", 1), Genes(256, 2.0, 1e-3, 0.1, "all_linear", 2)
    seen_mixed = False
    for _ in range(200):
        child = crossover(a, b, rng).to_dict()
        assert all(child[k] in (a.to_dict()[k], b.to_dict()[k]) for k in child)
        seen_mixed |= child != a.to_dict() and child != b.to_dict()
    assert seen_mixed


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_crossover_happens_at_the_configured_rate_for_p6_k2(rate):
    """LoRALab's integer truncation made crossover never happen with P = 6, K = 2; here it happens
    at crossover_rate (binomial test, 4 sigma, fixed seed)."""
    config = EvolutionConfig(population=6, generations=10, keep_top=2, mutation_rate=0.3, crossover_rate=rate)
    children = crossed = 0
    for generation in range(500):
        plans = next_generation(population(6, generation), config, SPACE, generation_rng(7, generation), set())
        for plan in plans[config.keep_top:]:
            children += 1
            crossed += plan.origin == "crossover"
    share = crossed / children
    assert children == 2000
    assert abs(share - rate) <= 4 * (rate * (1 - rate) / children) ** 0.5 + 1e-12


def test_selection_keeps_the_top_k_with_ties_to_the_older_and_unscored_last():
    genes = [sample(SPACE, random.Random(i)) for i in range(5)]
    members = [Member(5, genes[0], 0.5), Member(2, genes[1], 0.5), Member(3, genes[2], None),
               Member(4, genes[3], 0.9), Member(1, genes[4], -1.0)]
    assert [m.id for m in rank(members)] == [4, 2, 5, 1, 3]
    config = EvolutionConfig(population=5, keep_top=2)
    plans = next_generation(members, config, SPACE, random.Random(0), set())
    survivors = [p for p in plans if p.origin == "survivor"]
    assert [(p.parents, p.init_from, p.genes) for p in survivors] == [([4], 4, genes[3]), ([2], 2, genes[1])]


def test_children_record_their_lineage():
    config = EvolutionConfig(population=6, keep_top=2, crossover_rate=0.5, mutation_rate=0.3)
    members = population(6)
    survivors = {m.id for m in rank(members)[:2]}
    by_id = {m.id: m for m in members}
    for generation in range(50):
        for plan in next_generation(members, config, SPACE, generation_rng(0, generation), set())[2:]:
            assert plan.origin in ("mutation", "crossover")
            assert len(plan.parents) == (2 if plan.origin == "crossover" else 1)
            assert set(plan.parents) <= survivors and plan.init_from in plan.parents
            if plan.origin == "mutation":
                parent = by_id[plan.parents[0]].genes.to_dict()
                assert plan.mutated and all(plan.genes.to_dict()[g] != parent[g] for g in plan.mutated)
            donor = by_id[plan.init_from].genes
            other = [by_id[p].genes for p in plan.parents if p != plan.init_from]
            assert donor.rank == plan.genes.rank or all(o.rank != plan.genes.rank for o in other)


def test_duplicates_are_avoided_within_a_generation_and_across_the_run():
    space = SearchSpace(ranks=[4, 8], alpha_multipliers=[1.0], learning_rates=[1e-4, 2e-4], dropouts=[0.0],
                        target_modules={"qv": ["q_proj", "v_proj"], "all": ["q_proj"]}, epochs=[1])
    # 2 x 2 x 2 = 8 configurations (plus scaled learning rates)
    config = EvolutionConfig(population=4, keep_top=2, mutation_rate=0.3, crossover_rate=0.2)
    plans = initial_population(space, 4, random.Random(0))
    assert len({p.genes.key() for p in plans}) == 4
    members = [Member(i, p.genes, float(i)) for i, p in enumerate(plans)]
    seen = {p.genes.key() for p in plans}
    for generation in range(1, 6):
        plans = next_generation(members, config, space, generation_rng(0, generation), seen)
        keys = [p.genes.key() for p in plans]
        assert len(set(keys)) == len(keys)
        assert not {p.genes.key() for p in plans[2:]} & seen
        seen |= set(keys)
        fitness = random.Random(generation)
        members = [Member(100 * generation + i, p.genes, fitness.random()) for i, p in enumerate(plans)]


def test_breeding_is_reproducible_with_a_seed():
    config = EvolutionConfig(population=6, keep_top=2, crossover_rate=0.4)
    members = population(6)
    first = next_generation(members, config, SPACE, generation_rng(11, 3), set())
    again = next_generation(members, config, SPACE, generation_rng(11, 3), set())
    other = next_generation(members, config, SPACE, generation_rng(12, 3), set())
    assert first == again
    assert first != other
    assert initial_population(SPACE, 6, generation_rng(5, 0)) == initial_population(SPACE, 6, generation_rng(5, 0))


@pytest.mark.parametrize("preset", preset_names("evolm.presets.search"))
def test_every_search_preset_is_valid(preset):
    config = load_config(preset, ["model.name_or_path=x"], SearchRunConfig, presets="evolm.presets.search")
    assert config.task.name == preset


def test_config_validation_and_test_modes():
    base = ["model.name_or_path=x"]
    config = load_config("gsm8k", base, SearchRunConfig, presets="evolm.presets.search")
    assert (config.evolution.population, config.evolution.generations, config.evolution.keep_top) == (6, 10, 2)
    assert (config.evolution.mutation_rate, config.evolution.crossover_rate) == (0.3, 0.2)
    pipeline = apply_mode(config, "pipeline")
    assert (pipeline.evolution.population, pipeline.evolution.generations, pipeline.task.train_size,
            pipeline.splits.validation_size, pipeline.task.test_size) == (3, 2, 15, 15, 15)
    quick = apply_mode(config, "quick")
    assert (quick.evolution.population, quick.evolution.keep_top, quick.task.train_size) == (2, 1, 120)
    with pytest.raises(ConfigError, match="keep_top"):
        load_config("gsm8k", base + ["evolution.keep_top=6"], SearchRunConfig, presets="evolm.presets.search")
    with pytest.raises(ConfigError, match="unknown field 'evolution.popsize'"):
        load_config("gsm8k", base + ["evolution.popsize=6"], SearchRunConfig, presets="evolm.presets.search")
    with pytest.raises(ConfigError, match="learning_rate_bounds"):
        load_config("gsm8k", base + ["space.learning_rates=[0.5]"], SearchRunConfig, presets="evolm.presets.search")
    with pytest.raises(ConfigError, match="refresh_targets_every resamples self-sampled targets: it needs "
                                          "training.targets=self"):
        load_config("gsm8k", base + ["training.refresh_targets_every=2"], SearchRunConfig,
                    presets="evolm.presets.search")
    with pytest.raises(ConfigError, match="splits.validation_size: Input should be greater than or equal to 1"):
        load_config("gsm8k", base + ["splits.validation_size=0"], SearchRunConfig, presets="evolm.presets.search")
    with pytest.raises(ConfigError, match="baseline: Input should be 'none' or 'default-lora'"):
        load_config("gsm8k", base + ["baseline=lora"], SearchRunConfig, presets="evolm.presets.search")
