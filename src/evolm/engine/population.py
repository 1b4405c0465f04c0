"""The population engine: every member's low-rank delta applied per batch row, one batched generation for all.

Targeted nn.Linear layers are wrapped in place (engine/layer.py); a backend runs the decoding steps
(engine/transformers_backend.py for any model, engine/fused_backend.py for Llama-family models on a
GPU). The engine knows nothing of ES: it takes low-rank factors and prompts and returns tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evolm.engine import fused_backend
from evolm.engine.decoding import SamplingParams, cut_at_stop, decode
from evolm.engine.layer import LowRankWeights, PopulationLinear, RowState, find_target_linears
from evolm.engine.transformers_backend import TransformersBackend

SYNC_EVERY_ON_GPU = 8  # decoding steps between host checks for finished rows on an accelerator


@dataclass
class Generation:
    """Completions indexed [member slot][prompt] (slots follow the `members` argument's order)."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]
    num_tokens: int = 0
    waves: list[int] = field(default_factory=list)  # rows per wave
    steps: list[int] = field(default_factory=list)  # decoding steps per wave


class PopulationEngine:
    """Batched generation for a population of LoRA adapters on one transformers causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        target_modules: Sequence[str],
        layers: Sequence[int] | None = None,
        *,
        eos_token_ids: Sequence[int] = (),
        max_batch_rows: int | None = None,
        memory_fraction: float = 0.85,
        backend: str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.rows = RowState()
        self.eos_token_ids = list(eos_token_ids) or [tokenizer.eos_token_id]
        self.max_batch_rows = max_batch_rows
        self.memory_fraction = memory_fraction
        self.layers: dict[str, PopulationLinear] = {}
        targets = find_target_linears(model, target_modules, layers) if target_modules else {}
        for name, linear in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = getattr(parent, child)
            if not isinstance(wrapped, PopulationLinear):
                wrapped = PopulationLinear(linear, self.rows)
                setattr(parent, child, wrapped)
            self.layers[name] = wrapped
        self.population = 0
        self.rank = 0
        self.backend = self._choose_backend(backend)
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY_ON_GPU

    def _choose_backend(self, name: str):
        on_gpu = self.device.type == "cuda"  # on a CPU the transformers path is as fast and simpler
        supported = fused_backend.supports(self.model)
        if name == "fused" or (name == "auto" and on_gpu and supported):
            if not supported:
                raise ValueError(f"the fused backend does not support {self.model.config.model_type} models")
            return fused_backend.FusedBackend(self.model, self.layers, self.pad_token_id)
        return TransformersBackend(self.model, self.rows, self.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pad_token_id(self) -> int:
        """What left padding is filled with (masked out, so any id works; the tokenizer's if it has one)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every targeted layer, in a fixed order."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def set_adapters(self, weights: dict[str, LowRankWeights], scale: float) -> None:
        """Load the population's adapters (N members, rank r) into the wrapped layers."""
        if set(weights) != set(self.layers):
            missing = sorted(set(self.layers) - set(weights))[:3]
            raise ValueError(f"adapters must cover every targeted layer (missing e.g. {missing})")
        first = next(iter(weights.values()))
        self.population, self.rank = first.A.shape[0], first.A.shape[1]
        for name, w in weights.items():
            layer = self.layers[name]
            layer.lora_A = w.A.reshape(-1, w.A.shape[-1]).to(self.device, self.dtype)
            layer.lora_B = w.B.transpose(1, 2).reshape(-1, w.B.shape[1]).to(self.device, self.dtype)
            layer.scale = scale
        self.backend.set_adapters(self.population, self.rank)

    def clear_adapters(self) -> None:
        for layer in self.layers.values():
            layer.lora_A = layer.lora_B = None
        self.population = self.rank = 0
        self.backend.set_adapters(0, 0)

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], members: Sequence[int] | None, params: SamplingParams,
        on_wave: Callable[[int], object] | None = None,
    ) -> Generation:
        """Every (member, prompt) row, member-major, in waves that fit the memory budget.

        `members` lists population indices to run (a share of the population, for one process
        of several); None runs the model without adapters as a single slot. `on_wave` gets the
        number of rows of each finished wave (a progress bar's update).
        """
        slots = list(members) if members is not None else [None]
        if members is not None and any(not 0 <= m < self.population for m in slots):
            raise ValueError(f"members must lie in [0, {self.population})")
        rows = [(slot, p) for slot in range(len(slots)) for p in range(len(prompts))]
        tokens: list[list[list[int]]] = [[[] for _ in prompts] for _ in slots]
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        waves: list[int] = []
        steps: list[int] = []
        start = 0
        wave_rows = self._wave_rows(max(len(p) for p in prompts), params.max_new_tokens)
        while start < len(rows):
            wave = rows[start : start + wave_rows]
            member_ids = None if members is None else [slots[s] for s, _ in wave]
            members_tensor = None if member_ids is None else torch.as_tensor(member_ids, device=self.device)
            outputs, wave_steps = decode(self.backend, [prompts[p] for _, p in wave], members_tensor, params,
                                         self.eos_token_ids, self.tokenizer, generator, self.sync_every)
            for (slot, p), out in zip(wave, outputs):
                tokens[slot][p] = out
            waves.append(len(wave))
            steps.append(wave_steps)
            start += len(wave)
            if on_wave is not None:
                on_wave(len(wave))
        texts = [[self._text(t, params.stop_strings) for t in row] for row in tokens]
        return Generation(tokens, texts, sum(len(t) for row in tokens for t in row), waves, steps)

    def member(self, member: int) -> AbstractContextManager:
        """Within this context a plain forward of the model runs as population member `member`."""
        return _RowsAs(self, member)

    @torch.inference_mode()
    def kl(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           policy: Callable[[], AbstractContextManager], reference: Callable[[], AbstractContextManager]) -> dict:
        """KL(policy ‖ reference) along the completions, summed over tokens per sequence.

        `policy` and `reference` make contexts in which a plain forward of the model is that model (a
        member's adapter, or other weights swapped in). For each completion token position t:
        Σ_v p(v) (log p(v) − log q(v)), with p the policy's next-token distribution.
        """
        totals, tokens = [], 0
        for prompt, completion in zip(prompts, completions):
            if not completion:
                totals.append(0.0)
                continue
            ids = torch.as_tensor([list(prompt) + list(completion)], device=self.device)
            logp = []
            for state in (policy, reference):
                with state():
                    logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
                logp.append(torch.log_softmax(logits, dim=-1))
            kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
            totals.append(kl.sum().item())
            tokens += kl.numel()
        return {"kl": sum(totals) / max(len(totals), 1), "kl_per_token": sum(totals) / max(tokens, 1)}

    def _text(self, tokens: list[int], stop_strings: Sequence[str]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return cut_at_stop(text, stop_strings)[0]

    def _wave_rows(self, prompt_len: int, max_new_tokens: int) -> int:
        """Rows per wave: the configured cap, else what the KV cache and logits of a row allow."""
        if self.max_batch_rows:
            return self.max_batch_rows
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bytes_per = torch.finfo(self.dtype).bits // 8
        seq = prompt_len + max_new_tokens
        kv = 2 * config.num_hidden_layers * kv_heads * head_dim * seq * bytes_per
        # a dynamic cache is copied when it grows and when rows are dropped; the fused one is allocated once
        copies = 1 if self.backend.preallocates else 3
        row_bytes = copies * kv + prompt_len * config.intermediate_size * 4 * bytes_per + config.vocab_size * 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = (free + cached) * self.memory_fraction  # blocks the allocator holds but no tensor uses
        else:
            budget = 4 * 2**30
        return max(1, int(budget // row_bytes))


class _RowsAs:
    """Every row of a plain forward runs as one member (None: no delta at all)."""

    def __init__(self, engine: PopulationEngine, member: int | None):
        self.engine, self.member = engine, member

    def __enter__(self):
        engine = self.engine
        if self.member is not None:
            engine.rows.set(torch.tensor([self.member], device=engine.device), engine.population, engine.rank,
                            engine.dtype)

    def __exit__(self, *exc):
        self.engine.rows.set(None, 0, 0, self.engine.dtype)
