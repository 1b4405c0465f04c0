"""Natural Evolution Strategies as an ask/tell object: knows vectors and fitnesses, not language models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from evolm.es.noise import gaussian, stream_key

Shaping = Literal["zscore", "centered_rank", "raw"]
Optimizer = Literal["es", "adam"]


def shape_fitness(fitness: torch.Tensor, method: Shaping) -> torch.Tensor:
    """Turn raw fitnesses into update weights; invariant to reward scale except for `raw`."""
    f = fitness.double()
    if method == "raw":
        return f
    if method == "zscore":  # the paper: (f - mean) / std, population std
        return (f - f.mean()) / (f.std(unbiased=False) + 1e-8)
    if method == "centered_rank":  # OpenAI ES: ranks mapped to [-0.5, 0.5], ties share the mean rank
        ranks = torch.empty_like(f)
        order = torch.argsort(f, stable=True)
        ranks[order] = torch.arange(len(f), dtype=f.dtype)
        for value in torch.unique(f):
            tied = f == value
            ranks[tied] = ranks[tied].mean()
        return ranks / max(len(f) - 1, 1) - 0.5
    raise ValueError(f"unknown fitness shaping '{method}'")


class EvolutionStrategy:
    """θ ← θ + α · (1/N) Σ shaped_i · ε_i, with ε regenerated from (seed, generation, pair).

    Member i uses noise pair i // 2 with sign + for even i and - for odd i when antithetic;
    otherwise member i has its own noise. 1/σ is folded into α, as in the paper.
    """

    def __init__(
        self,
        theta: torch.Tensor,
        *,
        population: int,
        sigma: float,
        learning_rate: float,
        antithetic: bool = True,
        fitness_shaping: Shaping = "zscore",
        optimizer: Optimizer = "es",
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
    ):
        if antithetic and population % 2:
            raise ValueError("antithetic sampling needs an even population")
        self.theta = theta.detach().to(torch.float32).clone()
        self.population, self.sigma, self.learning_rate = population, sigma, learning_rate
        self.antithetic, self.fitness_shaping, self.optimizer = antithetic, fitness_shaping, optimizer
        self.weight_decay, self.betas, self.seed = weight_decay, betas, seed
        self.generation = 0
        self.adam_step = 0
        self.adam_m = torch.zeros_like(self.theta) if optimizer == "adam" else None
        self.adam_v = torch.zeros_like(self.theta) if optimizer == "adam" else None
        self._noise_cache: tuple[int, torch.Tensor] | None = None  # ask() and tell() share one draw

    @property
    def num_noise_vectors(self) -> int:
        return self.population // 2 if self.antithetic else self.population

    def signs(self) -> torch.Tensor:
        if not self.antithetic:
            return torch.ones(self.population)
        return torch.tensor([1.0, -1.0]).repeat(self.population // 2)

    def noise(self, generation: int | None = None) -> torch.Tensor:
        """[num_noise_vectors, D] unsigned noise of a generation (the current one by default)."""
        g = self.generation if generation is None else generation
        if self._noise_cache is not None and self._noise_cache[0] == g:
            return self._noise_cache[1]
        dim, device = self.theta.numel(), self.theta.device
        noise = torch.stack(
            [gaussian(stream_key(self.seed, g, k), 0, dim, device) for k in range(self.num_noise_vectors)]
        )
        self._noise_cache = (g, noise)
        return noise

    def member_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """[N, D] signed noise, member-major, from the unsigned noise vectors."""
        rows = noise.repeat_interleave(2, dim=0) if self.antithetic else noise
        return rows * self.signs().to(rows.device, rows.dtype)[:, None]

    def ask(self) -> torch.Tensor:
        """[N, D] parameters of this generation's members: θ + σ ε_i."""
        return self.theta + self.sigma * self.member_noise(self.noise())

    def tell(self, fitness: Sequence[float] | torch.Tensor) -> dict[str, float]:
        """Update θ from the members' fitnesses (in member order) and advance the generation."""
        fitness = torch.as_tensor(fitness, dtype=torch.float64).flatten()
        if fitness.numel() != self.population:
            raise ValueError(f"expected {self.population} fitnesses, got {fitness.numel()}")
        if not torch.isfinite(fitness).all():
            raise ValueError(f"non-finite fitness in generation {self.generation}: {fitness.tolist()}")
        weights = shape_fitness(fitness, self.fitness_shaping).float().to(self.theta.device)
        signed = weights * self.signs().to(weights.device)
        noise = self.noise()
        if self.antithetic:  # pair k contributes (w+ - w-) ε_k
            signed = signed.view(-1, 2).sum(dim=1)
        gradient = (signed @ noise) / self.population
        step = self._step(gradient)
        if self.weight_decay:
            self.theta.mul_(1.0 - self.learning_rate * self.weight_decay)
        self.theta.add_(step)
        self.generation += 1
        return {"gradient_norm": gradient.norm().item(), "step_norm": step.norm().item()}

    def _step(self, gradient: torch.Tensor) -> torch.Tensor:
        if self.optimizer == "es":
            return self.learning_rate * gradient
        beta1, beta2 = self.betas
        self.adam_step += 1
        self.adam_m.mul_(beta1).add_(gradient, alpha=1 - beta1)
        self.adam_v.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        m_hat = self.adam_m / (1 - beta1**self.adam_step)
        v_hat = self.adam_v / (1 - beta2**self.adam_step)
        return self.learning_rate * m_hat / (v_hat.sqrt() + 1e-8)

    def state_dict(self) -> dict:
        return {
            "theta": self.theta.cpu(),
            "generation": self.generation,
            "adam_step": self.adam_step,
            "adam_m": None if self.adam_m is None else self.adam_m.cpu(),
            "adam_v": None if self.adam_v is None else self.adam_v.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.theta.device
        self.theta = state["theta"].to(device)
        self.generation = state["generation"]
        self.adam_step = state["adam_step"]
        self.adam_m = None if state["adam_m"] is None else state["adam_m"].to(device)
        self.adam_v = None if state["adam_v"] is None else state["adam_v"].to(device)
