"""PEFT LoRA adapter folders: the one place that knows PEFT's key names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

PEFT_PREFIX = "base_model.model."


def peft_key(layer: str, which: str) -> str:
    """The safetensors key of a layer's lora_A or lora_B weight in a PEFT folder."""
    return f"{PEFT_PREFIX}{layer}.{which}.weight"


def read_peft_adapter(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter_config.json as a dict and {layer name: (A, B)} from a PEFT LoRA folder."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"not a PEFT adapter folder (no adapter_config.json): {path}")
    config = json.loads(config_file.read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        weights[name] = (value, tensors[key.replace(".lora_A.", ".lora_B.")])
    return config, weights
