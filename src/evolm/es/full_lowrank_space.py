"""EGGROLL (arXiv 2511.16652): the weight matrices evolve, each member's perturbation is rank r.

Member i perturbs every targeted W by σ·E_i, E_i = B_i A_i / √r with fresh standard normal factors, so
each entry of E_i has variance 1 (σ and α mean what they mean in the paper). The members' factors go
into the population engine exactly like LoRA adapters — one batched generation for all — while the
update Σ z_i E_i (the strategy's) is high-rank.
"""

from __future__ import annotations

import math

import torch

from evolm.engine import LowRankWeights, PopulationEngine
from evolm.es.space import WeightSpace


class FullLowRankSpace(WeightSpace):
    kind = "full-lowrank"

    def __init__(self, engine: PopulationEngine, rank: int, keep_base: bool = False):
        super().__init__(engine, keep_base)
        self.noise_rank = rank

    def generate_population(self, population, members, prompts, sampling):
        self.write(population.params)
        noise = [population.noise(m) for m in range(population.size)]
        factors = {name: LowRankWeights(A=torch.stack([n[name][0] for n in noise]),
                                        B=torch.stack([n[name][1] for n in noise]))
                   for name in self.linears}
        self.engine.set_factors(factors, population.sigma / math.sqrt(self.noise_rank))
        return self.engine.generate(prompts, members, sampling)
