"""What evolves, as the ES loop sees it: θ's tensors, how the population is evaluated, and the export.

Three kinds, one file each: lora_space.py (a LoRA adapter), full_lowrank_space.py (the weight matrices,
rank-r noise evaluated per batch row) and full_space.py (the weight matrices, dense noise, members
one after another). The last two share WeightSpace below: an fp32 master of the evolving weights
lives in the strategy, and the model's own (bf16) weights are written from it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

from evolm.engine import Completions, PopulationEngine, SamplingParams
from evolm.es.strategy import Population
from evolm.models import stored_dtype
from evolm.runs import EXPORT_INFO, fresh_dir_beside, replace_dir


class Space(ABC):
    """θ's tensors and how a population of perturbations of them is evaluated on the engine."""

    kind: str
    noise_rank: int | None = None  # the strategy's noise: None dense, r low-rank
    params_in_checkpoint = True  # θ is small enough to store; otherwise checkpoints replay the fitness log

    def __init__(self, engine: PopulationEngine):
        self.engine = engine

    @abstractmethod
    def initial_params(self, seed: int) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def generate_population(self, population: Population, members: Sequence[int], prompts: list[list[int]],
                            sampling: SamplingParams) -> Completions:
        """The given members' completions on the prompts (slots in `members` order);
        `seconds` holds its time by part (the engine's prefill and decode device seconds, and time spent
        outside the engine such as writing noisy weights), shares of the generation's time."""

    @abstractmethod
    def generate_center(self, params: dict[str, torch.Tensor], prompts: list[list[int]],
                        sampling: SamplingParams) -> Completions:
        """Completions of θ itself (one slot); afterwards a plain forward of the model is θ (see policy)."""

    @abstractmethod
    def policy(self) -> AbstractContextManager:
        """A plain forward of the model inside is θ (valid after generate_center)."""

    @abstractmethod
    def reference(self) -> AbstractContextManager:
        """A plain forward of the model inside is the base model."""

    @abstractmethod
    def export(self, params: dict[str, torch.Tensor], path: Path, base_model: str) -> Path: ...


class WeightSpace(Space):
    """The targeted weight matrices themselves evolve; the model's weights are written from θ."""

    params_in_checkpoint = False  # θ is the model: a checkpoint is the fitness log, replayed on resume

    def __init__(self, engine: PopulationEngine, keep_base: bool = False):
        super().__init__(engine)
        self.linears = {name: layer.base for name, layer in engine.layers.items()}
        # the base weights, for KL to the base model; only kept when asked (a second copy of the targets)
        self.base = {n: lin.weight.detach().clone() for n, lin in self.linears.items()} if keep_base else None

    def initial_params(self, seed: int) -> dict[str, torch.Tensor]:
        return {name: lin.weight.detach() for name, lin in self.linears.items()}

    @torch.no_grad()
    def write(self, params: dict[str, torch.Tensor]) -> None:
        """The model's weights become θ (rounded to the model's dtype); in place, so fused views follow."""
        for name, lin in self.linears.items():
            lin.weight.copy_(params[name])

    def generate_center(self, params, prompts, sampling):
        self.write(params)
        self.engine.clear_factors()
        return self.engine.generate(prompts, None, sampling)

    def policy(self):
        return nullcontext()

    @contextmanager
    def reference(self):
        if self.base is None:
            raise ValueError("KL to the base model needs the base weights: build the space with keep_base=True")
        current = {n: lin.weight.data for n, lin in self.linears.items()}
        try:
            for name, lin in self.linears.items():
                lin.weight.data = self.base[name]
            yield
        finally:
            for name, lin in self.linears.items():
                lin.weight.data = current[name]

    def export(self, params, path, base_model):
        """An ordinary Hugging Face model folder (weights, config, tokenizer) with θ written in, in the base's
        own dtype (a bf16 base run in fp32 on a CPU exports bf16); tied weights (an lm_head that is the
        embedding) stay one tensor, so transformers' saving writes them once."""
        self.write(params)
        model, path = self.engine.model, Path(path)
        dtype = stored_dtype(base_model) or self.engine.model.dtype
        wrapped = {f"{name}.base.weight": f"{name}.weight" for name in self.engine.layers}
        wrapped |= {f"{name}.base.bias": f"{name}.bias" for name in self.engine.layers}
        copies: dict[tuple, torch.Tensor] = {}  # by storage: a tied tensor is copied once and stays shared
        state = {}
        for key, value in model.state_dict().items():
            where = (value.data_ptr(), tuple(value.shape))
            if where not in copies:
                copies[where] = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype,
                                                  copy=True)
            state[wrapped.get(key, key)] = copies[where]
        tmp = fresh_dir_beside(path)
        model.save_pretrained(tmp, state_dict=state)
        config = json.loads((tmp / "config.json").read_text())  # it records the dtype the model ran in
        (tmp / "config.json").write_text(json.dumps(config | {"dtype": str(dtype).removeprefix("torch.")}, indent=2))
        self.engine.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps({"base_model": base_model, "space": self.kind}, indent=2))
        replace_dir(tmp, path)
        return path


def merge_completions(parts: list[Completions]) -> Completions:
    """One Completions value whose slots are the parts' single slots, in order."""
    return Completions(
        tokens=[p.tokens[0] for p in parts], texts=[p.texts[0] for p in parts],
        num_tokens=sum(p.num_tokens for p in parts), rows_at_once=max(p.rows_at_once for p in parts),
        steps=sum(p.steps for p in parts), row_steps=sum(p.row_steps for p in parts),
        refills=sum(p.refills for p in parts),
        seconds=_summed([p.seconds for p in parts]), host_seconds=_summed([p.host_seconds for p in parts]),
    )


def _summed(parts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(p.get(k, 0.0) for p in parts) for k in {k for p in parts for k in p}}
