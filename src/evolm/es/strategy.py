"""Natural Evolution Strategies as an ask/tell object: knows named tensors and fitnesses, not language models.

θ is a dict of fp32 tensors (a LoRA adapter's factors, or the weight matrices themselves). The noise
of member i is never stored: it is regenerated from (seed, generation, pair) by the counter-based
generator, so a run is fixed by its start, its config and the fitnesses it was told — `replay`
rebuilds θ (and Adam's moments) from that log alone.

Two kinds of noise:
- dense: ε has θ's shape, every entry standard normal (the paper's);
- low-rank (EGGROLL, arXiv 2511.16652), for 2-D tensors W [out, in]: ε = B A / √r with A [r, in] and
  B [out, r] standard normal, so every entry of ε has variance 1 and σ means what it means for dense
  noise. The update Σ_i z_i ε_i is high-rank and costs one matmul per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from evolm.counter_hash import stream_key
from evolm.es.noise import gaussian

Shaping = Literal["zscore", "centered_rank", "raw"]
Optimizer = Literal["es", "adam"]
NOISE_CHUNK = 1 << 24  # elements drawn per call of the generator: bounds its int64 temporaries


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


@dataclass(frozen=True)
class Population:
    """One generation's members, as `ask()` hands them to whoever evaluates them: θ, σ, and member i's signed
    noise regenerated on demand (nothing is materialised here). Member i uses noise pair i // 2 with sign +
    for even i and - for odd i when antithetic, else noise vector i. θ is the strategy's own: use a
    population before the `tell()` that ends its generation."""

    params: dict[str, torch.Tensor]
    sigma: float
    size: int
    antithetic: bool
    noise_rank: int | None  # None: dense noise; r: low-rank noise ε = B A / √r
    draw: Callable[[int], dict]  # unsigned noise vector of a pair: {name: ε} or {name: (A, B)}

    def pair(self, member: int) -> int:
        return member // 2 if self.antithetic else member

    def sign(self, member: int) -> float:
        return -1.0 if self.antithetic and member % 2 else 1.0

    def noise(self, member: int) -> dict:
        """Member i's signed noise: {name: ±ε} (dense) or {name: (A, ±B)} (low-rank, ε = B A / √r)."""
        noise, positive = self.draw(self.pair(member)), self.sign(member) > 0
        if self.noise_rank is None:
            return {name: eps if positive else -eps for name, eps in noise.items()}
        return {name: (a, b if positive else -b) for name, (a, b) in noise.items()}

    def members(self) -> dict[str, torch.Tensor]:
        """Dense noise: {name: [N, *shape]}, every member's θ + σ ε_i at once (for a small θ: a LoRA adapter)."""
        if self.noise_rank is not None:
            raise ValueError("members() stacks dense members; low-rank noise is applied as factors (see noise())")
        noise = [self.noise(m) for m in range(self.size)]
        return {name: p + self.sigma * torch.stack([n[name] for n in noise]) for name, p in self.params.items()}

    def perturbed(self, member: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Member i's own tensors θ + σ ε_i one at a time (dense noise): a whole model is never held twice."""
        if self.noise_rank is not None:
            raise ValueError("perturbed() adds dense noise; low-rank noise is applied as factors (see noise())")
        step = self.sigma * self.sign(member)
        for name, eps in self.draw(self.pair(member)).items():
            yield name, self.params[name].add(eps, alpha=step)


class EvolutionStrategy:
    """θ ← θ + α · (1/N) Σ shaped_i · ε_i, with ε regenerated from (seed, generation, pair).

    Members are asked for as a `Population` (see there for which noise each member uses). 1/σ is folded
    into α, as in the paper.
    `noise_rank` None draws dense noise; r draws rank-r noise for every 2-D tensor.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
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
        noise_rank: int | None = None,
    ):
        if antithetic and population % 2:
            raise ValueError("antithetic sampling needs an even population")
        if noise_rank is not None and any(p.dim() != 2 for p in params.values()):
            raise ValueError("low-rank noise needs 2-D tensors")
        self.params = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}
        self.population, self.sigma, self.learning_rate = population, sigma, learning_rate
        self.antithetic, self.fitness_shaping, self.optimizer = antithetic, fitness_shaping, optimizer
        self.weight_decay, self.betas, self.seed = weight_decay, betas, seed
        self.noise_rank = noise_rank
        self.generation = 0
        self.adam_step = 0
        self.adam_m = {n: torch.zeros_like(p) for n, p in self.params.items()} if optimizer == "adam" else None
        self.adam_v = {n: torch.zeros_like(p) for n, p in self.params.items()} if optimizer == "adam" else None
        self.fitness_log: list[list[float]] = []  # every generation's raw fitnesses: θ can be replayed from them
        self._layout = self._noise_layout()
        self._cache: tuple[int, int, dict] | None = None  # (generation, pair, noise): members of a pair share it

    # -- noise ----------------------------------------------------------------------------------

    @property
    def num_noise_vectors(self) -> int:
        return self.population // 2 if self.antithetic else self.population

    @property
    def noise_dim(self) -> int:
        """Standard normals drawn per noise vector."""
        return sum(size for _, _, size in self._layout)

    def _noise_layout(self) -> list[tuple[str, int, int]]:
        """(tensor, offset, size) in the noise stream; for low-rank noise A [r, in] comes before B [out, r]."""
        layout, offset = [], 0
        for name, p in self.params.items():
            size = p.numel() if self.noise_rank is None else self.noise_rank * (p.shape[0] + p.shape[1])
            layout.append((name, offset, size))
            offset += size
        return layout

    def noise(self, pair: int, generation: int | None = None) -> dict:
        """Unsigned noise vector `pair` of a generation: {name: ε} (dense) or {name: (A, B)} (low-rank)."""
        g = self.generation if generation is None else generation
        if self._cache is not None and self._cache[:2] == (g, pair):
            return self._cache[2]
        noise = dict(self._draw(stream_key(self.seed, g, pair)))
        self._cache = (g, pair, noise)
        return noise

    def _draw(self, key: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
        """Walk the layout drawing up to NOISE_CHUNK elements per call (small tensors share a call)."""
        device = next(iter(self.params.values())).device
        batch: list[tuple[str, int, int]] = []

        def flush():
            start = batch[0][1]
            flat = gaussian(key, start, batch[-1][1] + batch[-1][2] - start, device)
            for name, offset, size in batch:
                yield name, self._shape(name, flat[offset - start : offset - start + size])
            batch.clear()

        for entry in self._layout:
            if batch and entry[1] + entry[2] - batch[0][1] > NOISE_CHUNK:
                yield from flush()
            batch.append(entry)
        if batch:
            yield from flush()

    def _shape(self, name: str, flat: torch.Tensor):
        shape = self.params[name].shape
        if self.noise_rank is None:
            return flat.view(shape)
        r, (out, fan_in) = self.noise_rank, shape
        return flat[: r * fan_in].view(r, fan_in), flat[r * fan_in :].view(out, r)

    def ask(self) -> Population:
        """This generation's members as one value: θ, σ, and each member's signed noise, drawn when asked."""
        generation = self.generation
        return Population(self.params, self.sigma, self.population, self.antithetic, self.noise_rank,
                          lambda pair: self.noise(pair, generation))

    # -- update ---------------------------------------------------------------------------------

    def tell(self, fitness: Sequence[float] | torch.Tensor) -> dict[str, float]:
        """Update θ from the members' fitnesses (in member order) and advance the generation."""
        fitness = torch.as_tensor(fitness, dtype=torch.float64).flatten()
        if fitness.numel() != self.population:
            raise ValueError(f"expected {self.population} fitnesses, got {fitness.numel()}")
        if not torch.isfinite(fitness).all():
            raise ValueError(f"non-finite fitness in generation {self.generation}: {fitness.tolist()}")
        members = self.ask()
        signs = torch.tensor([members.sign(m) for m in range(self.population)])
        weights = shape_fitness(fitness, self.fitness_shaping).float() * signs
        if self.antithetic:  # pair k contributes (w+ - w-) ε_k
            weights = weights.view(-1, 2).sum(dim=1)
        gradient = self._gradient(weights / self.population)
        steps = self._steps(gradient)
        for name, p in self.params.items():
            if self.weight_decay:
                p.mul_(1.0 - self.learning_rate * self.weight_decay)
            p.add_(steps[name])
        self.fitness_log.append(fitness.tolist())
        self.generation += 1
        return {"gradient_norm": _norm(gradient.values()), "step_norm": _norm(steps.values())}

    def _gradient(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_k c_k ε_k per tensor: dense noise pair by pair; low-rank noise as one matmul per tensor."""
        device = next(iter(self.params.values())).device
        c = coefficients.to(device)
        if self.noise_rank is None:
            gradient = {name: torch.zeros_like(p) for name, p in self.params.items()}
            for k in range(self.num_noise_vectors):
                for name, eps in self.noise(k).items():
                    gradient[name].add_(eps, alpha=c[k].item())
            return gradient
        pairs = [self.noise(k) for k in range(self.num_noise_vectors)]
        r = self.noise_rank
        gradient = {}
        for name in self.params:
            a = torch.cat([p[name][0] for p in pairs])  # [K·r, in]
            b = torch.cat([p[name][1] for p in pairs], dim=1)  # [out, K·r]
            gradient[name] = (b * c.repeat_interleave(r)) @ a / math.sqrt(r)
        return gradient

    def _steps(self, gradient: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.optimizer == "es":
            return {name: self.learning_rate * g for name, g in gradient.items()}
        beta1, beta2 = self.betas
        self.adam_step += 1
        steps = {}
        for name, g in gradient.items():
            m, v = self.adam_m[name], self.adam_v[name]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1**self.adam_step)
            v_hat = v / (1 - beta2**self.adam_step)
            steps[name] = self.learning_rate * m_hat / (v_hat.sqrt() + 1e-8)
        return steps

    def replay(self, fitness_log: Sequence[Sequence[float]]) -> None:
        """Re-apply logged generations: the same updates, bit for bit, on the same device."""
        for fitness in fitness_log:
            self.tell(fitness)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self, with_params: bool = True) -> dict:
        """Generation and fitness log always; θ and Adam's moments only when asked (they can be replayed)."""
        state = {"generation": self.generation, "fitness_log": list(self.fitness_log), "adam_step": self.adam_step}
        if with_params:
            state["params"] = {n: p.cpu() for n, p in self.params.items()}
            state["adam_m"] = None if self.adam_m is None else {n: t.cpu() for n, t in self.adam_m.items()}
            state["adam_v"] = None if self.adam_v is None else {n: t.cpu() for n, t in self.adam_v.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state: θ loaded where the state has it, otherwise replayed from the fitness log."""
        if "params" not in state:
            if self.generation:
                raise ValueError("replaying a fitness log needs the strategy at generation 0")
            self.replay(state["fitness_log"])
            return
        device = next(iter(self.params.values())).device
        self.params = {n: state["params"][n].to(device) for n in self.params}
        if state["adam_m"] is not None:
            self.adam_m = {n: t.to(device) for n, t in state["adam_m"].items()}
            self.adam_v = {n: t.to(device) for n, t in state["adam_v"].items()}
        self.generation, self.adam_step = state["generation"], state["adam_step"]
        self.fitness_log = [list(f) for f in state["fitness_log"]]
        self._cache = None


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
