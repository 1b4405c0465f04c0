"""The population engine: every member's LoRA applied per batch row, one batched generation for all.

Targeted nn.Linear layers are wrapped in place. A wrapped layer holds the stacked adapters of the
whole population, A_cat [N·r, in] and B_cat [N·r, out]; a row's output is

    base(x) + scale · ((x A_catᵀ) ⊙ onehot(member(row))) B_cat

i.e. two matmuls over all members at once and a selector, with no loop over members and no
gather of weight matrices. Any row order works, so finished rows can be dropped from the batch
at any step. The engine knows nothing of ES: it takes adapters and prompts and returns tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from evolm.decoding import SamplingParams, cut_at_stop, decode, left_pad

SYNC_EVERY_ON_GPU = 8  # decoding steps between host checks for finished rows on an accelerator

@dataclass
class LoRAWeights:
    """One targeted layer's adapters for the whole population: A [N, r, in], B [N, out, r]."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass
class Generation:
    """Completions indexed [member slot][prompt] (slots follow the `members` argument's order)."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]
    num_tokens: int = 0
    waves: list[int] = field(default_factory=list)  # rows per wave
    steps: list[int] = field(default_factory=list)  # decoding steps per wave


class PopulationLinear(nn.Module):
    """A linear layer plus the per-row adapter of each row's population member."""

    def __init__(self, base: nn.Linear, rows: "RowState"):
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
        if layers is not None and _layer_index(name) not in set(layers):
            continue
        found[name] = module.base if isinstance(module, PopulationLinear) else module
    if not found:
        raise ValueError(f"no nn.Linear named {list(target_modules)} in {type(model).__name__}")
    return found


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for prev, part in zip(parts, parts[1:]):
        if prev in ("layers", "h", "blocks", "layer") and part.isdigit():
            return int(part)
    return None


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
        for name, linear in find_target_linears(model, target_modules, layers).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = getattr(parent, child)
            if not isinstance(wrapped, PopulationLinear):
                wrapped = PopulationLinear(linear, self.rows)
                setattr(parent, child, wrapped)
            self.layers[name] = wrapped
        self.population = 0
        self.rank = 0
        self.adapter_version = 0  # bumped on every change of adapters, so backends re-stack lazily
        self.current_max_new_tokens = 0
        self.backend = self._choose_backend(backend)
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY_ON_GPU

    def _choose_backend(self, name: str):
        from evolm import fused

        on_gpu = self.device.type == "cuda"  # on a CPU the transformers path is as fast and simpler
        if name == "fused" or (name == "auto" and on_gpu and fused.supports(self.model)):
            if not fused.supports(self.model):
                raise ValueError(f"the fused backend does not support {self.model.config.model_type} models")
            return fused.FusedBackend(self)
        return TransformersBackend(self)

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

    def set_adapters(self, weights: dict[str, LoRAWeights], scale: float) -> None:
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
        self.adapter_version += 1

    def clear_adapters(self) -> None:
        for layer in self.layers.values():
            layer.lora_A = layer.lora_B = None
        self.population = self.rank = 0
        self.adapter_version += 1

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], members: Sequence[int] | None, params: SamplingParams
    ) -> Generation:
        """Every (member, prompt) row, member-major, in waves that fit the memory budget.

        `members` lists population indices to run (a share of the population, for one process
        of several); None runs the model without adapters as a single slot.
        """
        slots = list(members) if members is not None else [None]
        if members is not None and any(not 0 <= m < self.population for m in slots):
            raise ValueError(f"members must lie in [0, {self.population})")
        rows = [(slot, p) for slot in range(len(slots)) for p in range(len(prompts))]
        tokens: list[list[list[int]]] = [[[] for _ in prompts] for _ in slots]
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.current_max_new_tokens = params.max_new_tokens
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
        texts = [[self._text(t, params.stop_strings) for t in row] for row in tokens]
        return Generation(tokens, texts, sum(len(t) for row in tokens for t in row), waves, steps)

    @torch.inference_mode()
    def kl_to_base(self, member: int, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> dict:
        """KL(member ‖ base) along the member's own completions, summed over tokens per sequence.

        For each completion token position t: Σ_v p(v) (log p(v) − log p_base(v)), with p the member's
        next-token distribution; the base is the same model with no adapter.
        """
        totals, tokens = [], 0
        for prompt, completion in zip(prompts, completions):
            if not completion:
                totals.append(0.0)
                continue
            ids = torch.as_tensor([list(prompt) + list(completion)] * 2, device=self.device)
            self.rows.set(torch.tensor([member, 0], device=self.device), self.population, self.rank, self.dtype)
            self.rows.selector[1].zero_()  # second row: no adapter at all
            try:
                logits = self.model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()
            finally:
                self.rows.set(None, 0, 0, self.dtype)
            logp = torch.log_softmax(logits, dim=-1)
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
        copies = 1 if getattr(self.backend, "preallocates", False) else 3
        row_bytes = copies * kv + prompt_len * config.intermediate_size * 4 * bytes_per + config.vocab_size * 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = (free + cached) * self.memory_fraction  # blocks the allocator holds but no tensor uses
        else:
            budget = 4 * 2**30
        return max(1, int(budget // row_bytes))


class TransformersBackend:
    """Any causal LM through its own forward and a transformers DynamicCache (the reference path)."""

    def __init__(self, engine: PopulationEngine):
        self.engine = engine

    def prefill(self, prompts, row_members):
        engine = self.engine
        ids, attention = left_pad(prompts, engine.pad_token_id)
        self.attention = attention.to(engine.device)
        positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        engine.rows.set(row_members, engine.population, engine.rank, engine.dtype)
        self.cache = DynamicCache(config=engine.model.config)
        self.next_position = positions[:, -1:] + 1
        return self._forward(ids.to(engine.device), positions)

    def step(self, tokens):
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.attention.shape[0], 1))], dim=1)
        logits = self._forward(tokens[:, None], self.next_position)
        self.next_position = self.next_position + 1
        return logits

    def keep(self, index):
        self.attention, self.next_position = self.attention[index], self.next_position[index]
        self.cache.reorder_cache(index)
        self.engine.rows.keep(index)

    def close(self):
        self.engine.rows.set(None, 0, 0, self.engine.dtype)
        self.cache = None

    def _forward(self, input_ids, positions):
        output = self.engine.model(
            input_ids=input_ids, attention_mask=self.attention, position_ids=positions,
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        )
        return output.logits[:, -1, :].float()
