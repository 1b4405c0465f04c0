"""PEFT LoRA adapters: the one place that knows how PEFT names an adapter's tensors, and that turns
adapters (a folder, or a PEFT model in memory) into population members of the engine.

PEFT saves the factors of the linear layer `model.layers.0.self_attn.q_proj` as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (and `lora_B`): the wrapper's
prefix, the layer's name in the base model, the factor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from evolm.engine import LowRankWeights, PopulationEngine

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
Factor = Literal["A", "B"]


def peft_key(layer_name: str, which: Factor) -> str:
    """The key of a layer's A [r, in] or B [out, r] factor in a PEFT state dict or weights file."""
    return f"{PREFIX}{layer_name}.lora_{which}.weight"


def layer_of(key: str) -> tuple[str, Factor] | None:
    """The base model's layer name and the factor a PEFT key holds; None for keys of anything else."""
    for which in ("A", "B"):
        marker = f".lora_{which}."
        if marker in key:
            return key.removeprefix(PREFIX).split(marker)[0], which
    return None


def lora_factors(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[Factor, torch.Tensor]]:
    """{layer name: {"A": tensor, "B": tensor}} from a PEFT state dict (keys of anything else ignored)."""
    factors: dict[str, dict[Factor, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        found = layer_of(key)
        if found is not None:
            factors.setdefault(found[0], {})[found[1]] = tensor
    return factors


def check_plain_lora(config: dict[str, Any]) -> None:
    """Refuse the PEFT variants the engine cannot apply exactly (they are not approximated)."""
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"only plain LoRA adapters can be evaluated (this one uses "
                         f"{unsupported or config.get('peft_type')})")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as the engine reads it: {layer name: (A [r, in], B [out, r])}, its scale alpha / r, and
    the base model it was trained on where it says so."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    base_model: str | None = None

    @classmethod
    def of_config(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> "Adapter":
        check_plain_lora(config)
        found = lora_factors(state_dict)
        return cls({name: (f["A"], f["B"]) for name, f in found.items()},
                   float(config["lora_alpha"]) / int(config["r"]), config.get("base_model_name_or_path"))

    @classmethod
    def of_folder(cls, folder: Path) -> "Adapter":
        """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"not a PEFT adapter folder (no {CONFIG_FILE}): {folder}")
        return cls.of_config(json.loads((folder / CONFIG_FILE).read_text()), load_file(folder / WEIGHTS_FILE))

    @classmethod
    def of_peft_model(cls, model) -> "Adapter":
        """The active adapter of a PEFT model in memory (training goes on: the factors are its own tensors)."""
        from peft import get_peft_model_state_dict

        return cls.of_config(model.peft_config[model.active_adapter].to_dict(), get_peft_model_state_dict(model))


def member_factors(adapters: list[Adapter | None], shapes: dict[str, tuple[int, int]]
                   ) -> tuple[dict[str, LowRankWeights], float]:
    """Adapters as the engine's population (member i is adapters[i]; None is the base model) and the scale.
    Ranks may differ: the factors are zero-padded to the largest rank; scales too: then each is folded into
    its B and the scale is 1, which leaves every member's update B·A·scale unchanged. Layers an adapter
    does not touch get zeros."""
    for adapter in adapters:
        unknown = sorted(set(adapter.factors) - set(shapes)) if adapter is not None else []
        if unknown:
            raise ValueError(f"the adapter has layers the engine does not target, e.g. {unknown[:3]}")
    present = [adapter for adapter in adapters if adapter is not None]
    scales = {adapter.scale for adapter in present}
    shared = scales.pop() if len(scales) == 1 else None
    rank = max((a.shape[0] for adapter in present for a, _ in adapter.factors.values()), default=1)
    weights = {}
    for name, (fan_in, fan_out) in shapes.items():
        a_rows, b_rows = torch.zeros(len(adapters), rank, fan_in), torch.zeros(len(adapters), fan_out, rank)
        for member, adapter in enumerate(adapters):
            if adapter is not None and name in adapter.factors:
                a, b = adapter.factors[name]
                a_rows[member, : a.shape[0]] = a
                b_rows[member, :, : b.shape[1]] = b if shared is not None else b * adapter.scale
        weights[name] = LowRankWeights(a_rows, b_rows)
    return weights, 1.0 if shared is None else shared


def set_members(engine: PopulationEngine, adapters: list[Adapter | None]) -> None:
    """Make each adapter a population member of the engine (None: the base model); see member_factors."""
    engine.set_factors(*member_factors(adapters, engine.shapes()))
