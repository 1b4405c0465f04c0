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
from evolm.engine.decoding import StopCheck, cut_at_stop, decode, decode_texts, trim_at_stops
from evolm.engine.layer import LowRankWeights, PopulationLinear, Routing, find_target_linears
from evolm.engine.sampling import SamplingParams, row_keys
from evolm.engine.scheduler import PhaseClock, stream
from evolm.engine.transformers_backend import TransformersBackend
from evolm.errors import UserError

SYNC_EVERY_ON_GPU = 8  # decoding steps between host checks for finished rows on an accelerator
REMEMBERED_PROMPTS = 1 << 16  # completion lengths kept for ordering the next generations' rows


@dataclass
class Completions:
    """One call's completions, indexed [member slot][prompt] (slots follow the `members` argument's order)."""

    tokens: list[list[list[int]]]
    texts: list[list[str]]
    num_tokens: int = 0
    rows_at_once: int = 0  # the most rows decoded together
    steps: int = 0  # decoding steps
    # rows decoded summed over the steps, padding included: num_tokens / row_steps is the share of useful work
    row_steps: int = 0
    refills: int = 0  # times finished rows' slots went to waiting rows (0 for the wave-by-wave backend)
    seconds: dict[str, float] = field(default_factory=dict)  # time by part: the engine's prefill and decode, ...
    # host seconds of the call's blocks (the fused engine's open, waits, stop checks, rebuilds, collect, release;
    # every backend's texts): the loop's overlap device time, so where the device idles is what they leave out
    host_seconds: dict[str, float] = field(default_factory=dict)


class PopulationEngine:
    """Batched generation for a population of low-rank perturbations of one transformers causal LM."""

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
        merge_share: float = 0.1,
        kv_cache_dtype: str = "model",
    ):
        """`merge_share`: the share of a generation's memory a merged copy of the perturbed weights may take, for
        the batches of one member group left (the fused backend; 0 never merges; see fused_backend).
        `kv_cache_dtype`: "model" (exact) or "fp8" (engine/kv_quant.py; only the fused backend has it, so
        "auto" picks that backend wherever the model allows, on a CPU too)."""
        self.model = model
        self.tokenizer = tokenizer
        self.routing = Routing()
        self.eos_token_ids = list(eos_token_ids) or [tokenizer.eos_token_id]
        self.max_batch_rows = max_batch_rows
        self.memory_fraction = memory_fraction
        self.merge_share = merge_share
        if kv_cache_dtype not in fused_backend.KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {fused_backend.KV_CACHE_DTYPES} (got {kv_cache_dtype!r})")
        self.kv_cache_dtype = kv_cache_dtype
        self.layers: dict[str, PopulationLinear] = {}
        targets = find_target_linears(model, target_modules, layers) if target_modules else {}
        for name, linear in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = getattr(parent, child)
            if not isinstance(wrapped, PopulationLinear):
                wrapped = PopulationLinear(linear, name, self.routing)
                setattr(parent, child, wrapped)
            wrapped.routing = self.routing
            self.layers[name] = wrapped
        self.backend = self._choose_backend(backend)
        self.last_lengths: dict[tuple[int, ...], float] = {}  # prompt -> mean completion length, last time
        self.stop_checks: dict[tuple[str, ...], StopCheck] = {}
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY_ON_GPU

    def _choose_backend(self, name: str):
        on_gpu = self.device.type == "cuda"  # on a CPU the transformers path is as fast and simpler
        supported = fused_backend.supports(self.model)
        fp8 = self.kv_cache_dtype == "fp8"
        if name == "fused" or (name == "auto" and (on_gpu or fp8) and supported):
            if not supported:
                raise ValueError(f"the fused backend does not support {self.model.config.model_type} models")
            return fused_backend.FusedBackend(self.model, self.layers, self.kv_cache_dtype)
        if fp8:
            raise UserError("decoding.kv_cache_dtype=fp8 needs the fused engine, which runs Llama, Qwen2/2.5, "
                            f"Qwen3 and Mistral (no sliding window) models, not this {self.model.config.model_type}"
                            " model (or backend=transformers was asked for): use kv_cache_dtype=model")
        return TransformersBackend(self.model, self.routing, self.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def population(self) -> int:
        return self.routing.population

    @property
    def pad_token_id(self) -> int:
        """What left padding is filled with (masked out, so any id works; the tokenizer's if it has one)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every targeted layer, in a fixed order."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def set_factors(self, factors: dict[str, LowRankWeights], scale: float) -> None:
        """The population's low-rank factors (N members, rank r) for every targeted layer; delta = scale · B A."""
        if set(factors) != set(self.layers):
            missing = sorted(set(self.layers) - set(factors))[:3]
            raise ValueError(f"factors must cover every targeted layer (missing e.g. {missing})")
        self.routing.load(factors, scale, self.device, self.dtype)

    def clear_factors(self) -> None:
        self.routing.clear()

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], members: Sequence[int] | None, params: SamplingParams,
        on_rows: Callable[[int], object] | None = None, keep_slots: bool = False,
    ) -> Completions:
        """Every (member, prompt) row, member-major, within the memory budget.

        `members` lists population indices to run (a share of the population, for one process
        of several); None runs the model without perturbation as a single slot. `on_rows` gets
        the number of rows that finished each time some did (a progress bar's update). The fused
        backend's KV slots (most of the free accelerator memory) are freed afterwards unless
        `keep_slots`: a caller about to generate the same layout again keeps them and their CUDA graphs.
        """
        slots = list(members) if members is not None else [None]
        if members is not None and any(not 0 <= m < self.population for m in slots):
            raise ValueError(f"members must lie in [0, {self.population})")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        clock = PhaseClock(self.device)
        seconds: dict[str, float] = {}
        if isinstance(self.backend, fused_backend.FusedBackend):
            tokens, rows_at_once, steps, row_steps, refills, seconds = self._stream(prompts, members, params,
                                                                                    on_rows, keep_slots, clock)
        else:
            tokens, rows_at_once, steps, row_steps = self._waves(prompts, members, slots, params, on_rows)
            refills = 0
        with clock.host("texts"):
            flat = trim_at_stops(self.tokenizer, [t for row in tokens for t in row], params.stop_strings)
            texts = [cut_at_stop(text, params.stop_strings)[0] for text in decode_texts(self.tokenizer, flat)]
        width = len(prompts)
        tokens = [flat[i : i + width] for i in range(0, len(flat), width)]
        texts = [texts[i : i + width] for i in range(0, len(texts), width)]
        return Completions(tokens, texts, sum(len(t) for row in tokens for t in row), rows_at_once, steps,
                           row_steps, refills, seconds, clock.host_seconds)

    def _stream(self, prompts, members, params, on_rows, keep_slots, clock: PhaseClock):
        """The fused backend: every row through a fixed set of KV slots, finished rows refilled.

        Prompts seen before are admitted longest first by their last completion length (ES asks the
        same prompts every generation), unseen ones before them: a late row is then a short row.
        """
        groups = len(members) if members is not None else 1
        capacity = max(len(p) for p in prompts) + params.max_new_tokens
        memory = self._budget_bytes()
        merged = self.backend.merge_bytes(self.routing) if members is not None else 0
        merge = 0 < merged <= self.merge_share * memory
        budget = self.max_batch_rows or self._slots_in_memory(capacity, max(len(p) for p in prompts),
                                                              memory - (merged if merge else 0))
        per_group = min(len(prompts), max(1, budget // groups))
        with clock.host("open"):  # KV slots allocated, a lone member's merged weights written
            self.backend.open(self.routing, members, per_group, capacity, params, self.eos_token_ids, merge)
        try:
            result = stream(self.backend, groups, per_group, prompts, params, self.eos_token_ids,
                            self._stop_check(params.stop_strings),
                            self.sync_every, on_rows, order=self._longest_first(prompts), clock=clock)
        except BaseException:
            self.backend.release()
            raise
        if not keep_slots:
            with clock.host("release"):
                self.backend.release()
        self._remember_lengths(prompts, result.tokens)
        return result.tokens, groups * per_group, result.steps, result.row_steps, result.refills, result.seconds

    def _stop_check(self, stop_strings: Sequence[str]) -> StopCheck:
        """One StopCheck per stop strings for this engine's life: building one decodes the vocabulary."""
        key = tuple(stop_strings)
        if key not in self.stop_checks:
            self.stop_checks[key] = StopCheck(self.tokenizer, key)
        return self.stop_checks[key]

    def _longest_first(self, prompts) -> list[int]:
        expected = [self.last_lengths.get(tuple(p), float("inf")) for p in prompts]
        return sorted(range(len(prompts)), key=lambda i: -expected[i])  # stable: unseen prompts keep their order

    def _remember_lengths(self, prompts, tokens) -> None:
        if len(self.last_lengths) > REMEMBERED_PROMPTS:
            self.last_lengths.clear()
        for i, prompt in enumerate(prompts):
            self.last_lengths[tuple(prompt)] = sum(len(group[i]) for group in tokens) / len(tokens)

    def _waves(self, prompts, members, slots, params, on_rows):
        """The transformers backend: waves of rows that fit the memory budget, one after another."""
        rows = [(slot, p) for slot in range(len(slots)) for p in range(len(prompts))]
        tokens: list[list[list[int]]] = [[[] for _ in prompts] for _ in slots]
        wave_rows = self._wave_rows(max(len(p) for p in prompts), params.max_new_tokens)
        steps = row_steps = 0
        for start in range(0, len(rows), wave_rows):
            wave = rows[start : start + wave_rows]
            member_ids = None if members is None else [slots[s] for s, _ in wave]
            members_tensor = None if member_ids is None else torch.as_tensor(member_ids, device=self.device)
            outputs, wave_steps = decode(self.backend, [prompts[p] for _, p in wave], members_tensor, params,
                                         self.eos_token_ids, self._stop_check(params.stop_strings),
                                         row_keys(params.seed, [p for _, p in wave]), self.sync_every)
            for (slot, p), out in zip(wave, outputs):
                tokens[slot][p] = out
            steps += wave_steps
            row_steps += len(wave) * wave_steps
            if on_rows is not None:
                on_rows(len(wave))
        return tokens, min(wave_rows, len(rows)), steps, row_steps

    def member(self, member: int) -> AbstractContextManager:
        """Within this context a plain forward of the model runs as population member `member`."""
        return _RowsAs(self, member)

    def kl(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           policy: Callable[[], AbstractContextManager], reference: Callable[[], AbstractContextManager]) -> dict:
        """KL(policy ‖ reference) along the completions (see sequence_kl). `policy` and `reference` make
        contexts in which a plain forward of the model is that model (a member's perturbation, or other
        weights swapped in)."""
        def forward_in(state):
            def forward(ids):
                with state():
                    return self.model(input_ids=ids).logits
            return forward
        return sequence_kl(forward_in(policy), forward_in(reference), prompts, completions, self.device)

    def _budget_bytes(self) -> float:
        """Accelerator memory a generation may take (on a CPU a fixed 4 GiB)."""
        if self.device.type != "cuda":
            return 4 * 2**30
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        held = self.backend.held_bytes()  # the fused backend keeps its slots from the last call
        return (free + cached + held) * self.memory_fraction  # blocks the allocator holds but no tensor uses

    def _slots_in_memory(self, capacity: int, prompt_width: int, memory: float) -> int:
        """KV slots (rows decoded at once) that fit in `memory` bytes beside the prefill's and the decoding step's
        activations."""
        config = self.model.config.get_text_config()
        bytes_per = torch.finfo(self.dtype).bits // 8
        prefill = fused_backend.PREFILL_TOKENS * (config.intermediate_size * 4 + config.hidden_size * 16
                                                   + prompt_width) * bytes_per
        per_row = self.backend.slot_bytes(capacity) + (config.vocab_size + config.intermediate_size * 4
                                                       + config.hidden_size * 16) * bytes_per
        # a batch of some member groups only copies their factors out: at most about the factors once more
        factors = sum(w.A.numel() + w.B.numel() for w in self.routing.factors.values()) * bytes_per
        return max(1, int((memory - prefill - factors) // per_row))

    def _wave_rows(self, prompt_len: int, max_new_tokens: int) -> int:
        """Rows per wave: the configured cap, else what the KV cache and logits of a row allow."""
        if self.max_batch_rows:
            return self.max_batch_rows
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bytes_per = torch.finfo(self.dtype).bits // 8
        kv = 2 * config.num_hidden_layers * kv_heads * head_dim * (prompt_len + max_new_tokens) * bytes_per
        # a dynamic cache grows and is copied when rows are dropped: about three copies at the peak
        row_bytes = 3 * kv + prompt_len * config.intermediate_size * 4 * bytes_per + config.vocab_size * 8
        return max(1, int(self._budget_bytes() // row_bytes))


class _RowsAs:
    """Every row of a plain forward runs as one member (None: no delta at all)."""

    def __init__(self, engine: PopulationEngine, member: int | None):
        self.engine, self.member = engine, member

    def __enter__(self):
        engine = self.engine
        if self.member is not None:
            engine.routing.route(torch.tensor([self.member], device=engine.device), engine.dtype)

    def __exit__(self, *exc):
        self.engine.routing.route(None, self.engine.dtype)


@torch.inference_mode()
def sequence_kl(policy: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], device: torch.device) -> dict:
    """KL(policy ‖ reference) along the completions, summed over tokens per sequence; `policy` and `reference`
    map token ids [1, T] to logits [1, T, vocab]. For each completion token position t:
    Σ_v p(v) (log p(v) − log q(v)), with p the policy's next-token distribution."""
    totals, tokens = [], 0
    for prompt, completion in zip(prompts, completions):
        if not completion:
            totals.append(0.0)
            continue
        ids = torch.as_tensor([list(prompt) + list(completion)], device=device)
        logp = [torch.log_softmax(forward(ids)[0, len(prompt) - 1 : -1].float(), dim=-1)
                for forward in (policy, reference)]
        kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
        totals.append(kl.sum().item())
        tokens += kl.numel()
    return {"kl": sum(totals) / max(len(totals), 1), "kl_per_token": sum(totals) / max(tokens, 1)}
