"""Where a member's perturbation enters the matmul: one routing object, handed to every wrapped layer.

The engine holds the population's low-rank factors for every targeted layer, stacked over members,
A_cat [N·r, in] and B_cat [N·r, out], in one `Routing` object, together with the member of each batch
row. A wrapped layer's output for a row is

    base(x) + scale · ((x A_catᵀ) ⊙ onehot(member(row))) B_cat

i.e. two matmuls over all members at once and a selector, with no loop over members and no gather
of weight matrices. Any row order works, so finished rows can be dropped at any step. The factors
are a LoRA adapter per member, or (full-lowrank ES) a rank-r perturbation of W itself: the layer
does not care which. (vLLM's punica wrapper plays this part there: one object, every layer.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LowRankWeights:
    """One targeted layer's factors for the whole population: A [N, r, in], B [N, out, r] (delta = B A)."""

    A: torch.Tensor
    B: torch.Tensor


def member_selector(row_members: torch.Tensor, members: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, members·width]: ones on the `width` columns of each row's own member, zeros elsewhere.

    A comparison rather than one_hot, so that it runs without a host sync (inside a CUDA graph).
    """
    column_member = torch.arange(members * width, device=row_members.device) // width
    return (row_members[:, None] == column_member[None, :]).to(dtype)


class Routing:
    """The population's factors per layer name, their scale, and which member each batch row runs as."""

    def __init__(self):
        self.factors: dict[str, LowRankWeights] = {}  # as given: A [N, r, in], B [N, out, r], on the device
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # A_cat [N·r, in], B_cat [N·r, out]
        self.scale = 1.0
        self.population = self.rank = 0
        self.selector: torch.Tensor | None = None  # [rows, 1, N·r] for the rows of the current forward

    def load(self, factors: dict[str, LowRankWeights], scale: float, device: torch.device, dtype: torch.dtype):
        first = next(iter(factors.values()))
        self.population, self.rank = first.A.shape[0], first.A.shape[1]
        self.factors = {n: LowRankWeights(w.A.to(device, dtype), w.B.to(device, dtype)) for n, w in factors.items()}
        self.stacked = {n: (w.A.reshape(-1, w.A.shape[-1]), w.B.transpose(1, 2).reshape(-1, w.B.shape[1]))
                        for n, w in self.factors.items()}
        self.scale = scale
        self.selector = None

    def clear(self) -> None:
        self.factors, self.stacked = {}, {}
        self.population = self.rank = 0
        self.selector = None

    @property
    def active(self) -> bool:
        return bool(self.factors)

    def route(self, row_members: torch.Tensor | None, dtype: torch.dtype) -> None:
        """The rows of the next forwards run as these members (None: every row is the base model)."""
        if row_members is None or not self.active:
            self.selector = None
            return
        self.selector = member_selector(row_members, self.population, self.rank, dtype).unsqueeze(1)

    def keep(self, index: torch.Tensor) -> None:
        if self.selector is not None:
            self.selector = self.selector.index_select(0, index)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's own member's low-rank delta of layer `name` at input x, or None where there is none."""
        if self.selector is None or name not in self.stacked:
            return None
        a, b = self.stacked[name]
        return ((x @ a.T) * self.selector) @ b * self.scale  # zero outside each row's own member's columns


class PopulationLinear(nn.Module):
    """A linear layer plus the low-rank delta of each row's population member, as the routing says."""

    def __init__(self, base: nn.Linear, name: str, routing: Routing):
        super().__init__()
        self.base = base
        self.name = name
        self.routing = routing

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.routing.delta(self.name, x)
        return out if delta is None else out + delta


def find_target_linears(
    model: nn.Module, target_modules: Sequence[str], layers: Sequence[int] | None = None
) -> dict[str, nn.Linear]:
    """Linear layers whose name ends with a target (as peft matches), optionally in chosen decoder layers."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, PopulationLinear)):
            continue
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        if layers is not None and layer_index(name) not in set(layers):
            continue
        found[name] = module.base if isinstance(module, PopulationLinear) else module
    if not found:
        raise ValueError(f"no nn.Linear named {list(target_modules)} in {type(model).__name__}")
    return found


def layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to, from its dotted name (model.layers.3.mlp… -> 3)."""
    parts = name.split(".")
    for prev, part in zip(parts, parts[1:]):
        if prev in ("layers", "h", "blocks", "layer") and part.isdigit():
            return int(part)
    return None
