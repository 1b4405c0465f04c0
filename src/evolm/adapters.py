"""PEFT LoRA adapter folders: the one place that knows how PEFT names an adapter's tensors.

PEFT saves the factors of the linear layer `model.layers.0.self_attn.q_proj` as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (and `lora_B`): the wrapper's
prefix, the layer's name in the base model, the factor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

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


def read_peft_adapter(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter_config.json as a dict and {layer name: (A, B)} from a PEFT LoRA folder."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"not a PEFT adapter folder (no {CONFIG_FILE}): {path}")
    config = json.loads(config_file.read_text())
    factors = lora_factors(load_file(path / WEIGHTS_FILE))
    return config, {name: (pair["A"], pair["B"]) for name, pair in factors.items()}
