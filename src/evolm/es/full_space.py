"""The paper's space: dense Gaussian noise on every targeted weight, members evaluated one after another.

Each member's weights are written as bf16(θ + σ ε_i) from the fp32 master θ, its rows generated, and the
model restored by writing bf16(θ) again: restoring never subtracts noise, so it is exact however many
perturb/restore cycles run. The two members of an antithetic pair share one draw of ε.
"""

from __future__ import annotations

import time

import torch

from evolm.es.space import WeightSpace, merge_completions
from evolm.es.strategy import Population


class FullSpace(WeightSpace):
    kind = "full"

    def generate_population(self, population, members, prompts, sampling):
        self.engine.clear_factors()
        parts, perturb_seconds = [], 0.0
        try:
            for i, member in enumerate(members):
                start = time.perf_counter()
                self.perturb(population, member)
                if self.engine.device.type == "cuda":
                    torch.cuda.synchronize(self.engine.device)
                perturb_seconds += time.perf_counter() - start
                # members one after another share one slot layout: keep it (and its CUDA graphs) until the last
                parts.append(self.engine.generate(prompts, None, sampling, keep_slots=i + 1 < len(members)))
        finally:
            self.write(population.params)
        merged = merge_completions(parts)
        merged.seconds["noise"] = perturb_seconds  # drawing ε and writing θ + σε, a share of "generate"
        return merged

    @torch.no_grad()
    def perturb(self, population: Population, member: int) -> None:
        for name, weight in population.perturbed(member):
            self.linears[name].weight.copy_(weight)
