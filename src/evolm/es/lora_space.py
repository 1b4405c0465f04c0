"""What evolves: a LoRA adapter laid out as one flat fp32 vector θ, and its PEFT export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from evolm.engine import LowRankWeights
from evolm.es.noise import gaussian, stream_key
from evolm.runs import replace_dir

_INIT_STREAM = 0x1A17  # keeps the initial-A draw apart from the ES noise streams


class LoRASpace:
    """θ = [A_1, B_1, A_2, B_2, …] over the targeted layers (sorted by name), A [r, in], B [out, r].

    The default init is peft's: A ~ U(-1/√in, 1/√in), B = 0, so θ₀ is the base model exactly.
    Both A and B evolve, so the first-order effect σ·ε_B·A of a perturbation is not zero.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float):
        self.shapes = dict(sorted(shapes.items()))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # peft's scaling for a standard (non-rslora) adapter
        self.slices: dict[str, tuple[slice, slice]] = {}
        offset = 0
        for name, (fan_in, fan_out) in self.shapes.items():
            a = slice(offset, offset + rank * fan_in)
            b = slice(a.stop, a.stop + fan_out * rank)
            self.slices[name] = (a, b)
            offset = b.stop
        self.dim = offset

    def initial_theta(self, seed: int, init: str = "standard") -> torch.Tensor:
        theta = torch.zeros(self.dim)
        for k, (name, (fan_in, fan_out)) in enumerate(self.shapes.items()):
            a, b = self.slices[name]
            bound = 1.0 / math.sqrt(fan_in)
            theta[a] = (2 * _uniform(seed, 2 * k, a.stop - a.start) - 1) * bound
            if init == "random":
                theta[b] = (2 * _uniform(seed, 2 * k + 1, b.stop - b.start) - 1) / math.sqrt(self.rank)
        return theta

    def unflatten(self, members: torch.Tensor) -> dict[str, LowRankWeights]:
        """[N, D] member parameters -> per-layer stacked adapters (views where possible)."""
        n = members.shape[0]
        out = {}
        for name, (fan_in, fan_out) in self.shapes.items():
            a, b = self.slices[name]
            out[name] = LowRankWeights(
                A=members[:, a].reshape(n, self.rank, fan_in), B=members[:, b].reshape(n, fan_out, self.rank)
            )
        return out

    def flatten(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per-layer (A [r, in], B [out, r]) of one adapter -> θ."""
        theta = torch.zeros(self.dim)
        for name, (a, b) in self.slices.items():
            A, B = weights[name]
            theta[a], theta[b] = A.float().flatten(), B.float().flatten()
        return theta

    def export_peft(self, theta: torch.Tensor, path: Path, base_model: str, layers: list[int] | None = None) -> Path:
        """Write a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        weights = self.unflatten(theta.detach().float().cpu()[None])
        tensors = {}
        for name, w in weights.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = w.A[0].contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = w.B[0].contiguous()
        save_file(tensors, tmp / "adapter_model.safetensors")
        targets = sorted({name.rsplit(".", 1)[-1] for name in self.shapes})
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
            layers_to_transform=layers, task_type="CAUSAL_LM", base_model_name_or_path=base_model,
        )
        config.save_pretrained(tmp)
        replace_dir(tmp, path)
        return path


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
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        weights[name] = (value, tensors[key.replace(".lora_A.", ".lora_B.")])
    return config, weights


def _uniform(seed: int, stream: int, count: int) -> torch.Tensor:
    """U(0, 1) from the counter-based stream (CDF of the standard normal: device independent)."""
    z = gaussian(stream_key(seed, _INIT_STREAM, stream), 0, count)
    return 0.5 * (1 + torch.erf(z.double() / math.sqrt(2))).float()

