"""Where a member's perturbation enters the matmul: a linear layer with one low-rank delta per batch row.

A wrapped layer holds the stacked low-rank factors of the whole population, A_cat [N·r, in] and
B_cat [N·r, out]; a row's output is

    base(x) + scale · ((x A_catᵀ) ⊙ onehot(member(row))) B_cat

i.e. two matmuls over all members at once and a selector, with no loop over members and no
gather of weight matrices. Any row order works, so finished rows can be dropped at any step.
The factors are a LoRA adapter per member, or (full-lowrank ES) a rank-r perturbation of W itself:
the layer does not care which.
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


def member_selector(row_members: torch.Tensor, population: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, N·r]: ones on the r columns of each row's own member in x·A_catᵀ, zeros elsewhere."""
    onehot = torch.nn.functional.one_hot(row_members, population).to(dtype)
    return onehot.repeat_interleave(rank, dim=1)


class RowState:
    """Which member each batch row belongs to, shared by every wrapped layer during a forward."""

    def __init__(self):
        self.selector: torch.Tensor | None = None  # [rows, 1, N·r] one-hot over member blocks

    def set(self, row_members: torch.Tensor | None, population: int, rank: int, dtype: torch.dtype) -> None:
        if row_members is None:
            self.selector = None
            return
        self.selector = member_selector(row_members, population, rank, dtype).unsqueeze(1)

    def keep(self, index: torch.Tensor) -> None:
        if self.selector is not None:
            self.selector = self.selector.index_select(0, index)


class PopulationLinear(nn.Module):
    """A linear layer plus the low-rank delta of each row's population member."""

    def __init__(self, base: nn.Linear, rows: RowState):
        super().__init__()
        self.base = base
        self.rows = rows
        self.lora_A: torch.Tensor | None = None  # [N·r, in]
        self.lora_B: torch.Tensor | None = None  # [N·r, out]
        self.scale = 1.0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        selector = self.rows.selector
        if self.lora_A is None or selector is None:
            return out
        hidden = (x @ self.lora_A.T) * selector  # [rows, T, N·r], zero outside the row's own member
        return out + (hidden @ self.lora_B) * self.scale


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
