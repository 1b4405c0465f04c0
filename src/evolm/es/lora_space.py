"""The default space: a LoRA adapter evolves (A [r, in] and B [out, r] per targeted layer); PEFT export.

The default init is peft's: A ~ U(-1/√in, 1/√in), B = 0, so θ₀ is the base model exactly. Both A and
B evolve, so the first-order effect σ·ε_B·A of a perturbation is not zero.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from evolm.adapters import WEIGHTS_FILE, peft_key
from evolm.counter_hash import stream_key
from evolm.engine import LowRankWeights, PopulationEngine
from evolm.es.noise import gaussian
from evolm.es.space import Space
from evolm.runs import EXPORT_INFO, fresh_dir_beside, replace_dir

_INIT_STREAM = 0x1A17  # keeps the initial-A draw apart from the ES noise streams


class LoRASpace(Space):
    """θ = {layer.lora_A, layer.lora_B, …} over the targeted layers, sorted by name."""

    kind = "lora"

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, *, init: str = "standard",
                 layers: list[int] | None = None, engine: PopulationEngine | None = None):
        super().__init__(engine)
        self.shapes = dict(sorted(shapes.items()))
        self.rank, self.alpha, self.init, self.layers = rank, alpha, init, layers
        self.scale = alpha / rank  # peft's scaling for a standard (non-rslora) adapter

    def initial_params(self, seed: int) -> dict[str, torch.Tensor]:
        params = {}
        for k, (name, (fan_in, fan_out)) in enumerate(self.shapes.items()):
            bound = 1.0 / math.sqrt(fan_in)
            params[f"{name}.lora_A"] = ((2 * _uniform(seed, 2 * k, self.rank * fan_in) - 1) * bound).view(self.rank, fan_in)
            b = torch.zeros(fan_out, self.rank)
            if self.init == "random":
                b = ((2 * _uniform(seed, 2 * k + 1, b.numel()) - 1) / math.sqrt(self.rank)).view_as(b)
            params[f"{name}.lora_B"] = b
        return params

    def unflatten(self, members: dict[str, torch.Tensor]) -> dict[str, LowRankWeights]:
        """{name: [N, …]} member parameters -> per-layer stacked adapters for the engine."""
        return {name: LowRankWeights(A=members[f"{name}.lora_A"], B=members[f"{name}.lora_B"]) for name in self.shapes}

    def params_of(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-layer (A [r, in], B [out, r]) of one adapter -> θ."""
        params = {}
        for name in self.shapes:
            a, b = weights[name]
            params[f"{name}.lora_A"], params[f"{name}.lora_B"] = a.float(), b.float()
        return params

    def generate_population(self, population, members, prompts, sampling):
        self.engine.set_factors(self.unflatten(population.members()), self.scale)
        return self.engine.generate(prompts, members, sampling)

    def generate_center(self, params, prompts, sampling):
        self.engine.set_factors(self.unflatten({n: p[None] for n, p in params.items()}), self.scale)
        return self.engine.generate(prompts, [0], sampling)

    def policy(self):
        return self.engine.member(0)

    def reference(self):
        return nullcontext()  # a plain forward outside the engine's member context has no adapter

    def export(self, params, path, base_model):
        """A standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
        path = Path(path)
        tmp = fresh_dir_beside(path)
        tensors = {}
        for name in self.shapes:
            for which in ("A", "B"):
                tensors[peft_key(name, which)] = params[f"{name}.lora_{which}"].detach().float().cpu().contiguous()
        save_file(tensors, tmp / WEIGHTS_FILE)
        targets = sorted({name.rsplit(".", 1)[-1] for name in self.shapes})
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
            layers_to_transform=self.layers, task_type="CAUSAL_LM", base_model_name_or_path=base_model,
        )
        config.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps({"base_model": base_model, "space": self.kind}, indent=2))
        replace_dir(tmp, path)
        return path


def _uniform(seed: int, stream: int, count: int) -> torch.Tensor:
    """U(0, 1) from the counter-based stream (CDF of the standard normal: device independent)."""
    z = gaussian(stream_key(seed, _INIT_STREAM, stream), 0, count)
    return 0.5 * (1 + torch.erf(z.double() / math.sqrt(2))).float()
