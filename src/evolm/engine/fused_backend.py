"""A fast decoding backend for Llama-family models (Llama, Qwen2/2.5, Qwen3, SmolLM, Mistral without a window).

It runs the model's own modules and weights but not its forward: per decoder layer four matmul
groups (qkv, o, gate+up, down) with the base weights of a group concatenated (the model's
parameters become views of them, so nothing is duplicated) and the population's adapters of a
group in one stacked A and one block-diagonal B, so a group costs

    y = x W_catᵀ + b;   y += ((x A_stackᵀ) ⊙ selector) B_blocks

The KV cache is preallocated once per wave; with left padding every row writes the same column
at each step, and finished rows are dropped by compacting the cache in place. Decode attention
folds the query heads that share a KV head into the query axis, so GQA needs no copy of K/V.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from evolm.engine.decoding import left_pad
from evolm.engine.layer import PopulationLinear, member_selector

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
GROUPS = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
PREFILL_TOKENS = 65536  # prompt tokens per prefill chunk: bounds activation memory
# cuDNN attention plans anew for every new key length (~5 ms of host time a call, measured on an H200),
# which a decoding step meets in every layer; the memory-efficient kernel has no such cost.
ATTENTION_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def supports(model: nn.Module) -> bool:
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and all(
        hasattr(layer, "self_attn") and hasattr(layer, "mlp") and all(hasattr(getattr(layer, parent), name)
                                                                     for parent, names in GROUPS.values()
                                                                     for name in names)
        for layer in layers
    )


@dataclass
class Group:
    """One matmul group of a decoder layer: concatenated base weights and the stacked adapters."""

    weight: torch.Tensor  # [sum out, in]
    bias: torch.Tensor | None
    splits: list[int]
    adapted: list[nn.Module]  # the population layers of this group (a subset of its projections)
    lora_A: torch.Tensor | None = None  # [P·N·r, in]
    lora_B: torch.Tensor | None = None  # [P·N·r, sum out], block diagonal, scale folded in
    projections: int = 0  # P: how many of the group's projections carry adapters

    def __call__(self, x: torch.Tensor, selectors: dict[int, torch.Tensor]) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        selector = selectors.get(self.projections)
        if self.lora_A is None or selector is None:
            return y
        hidden = F.linear(x, self.lora_A) * selector
        y.view(-1, y.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), self.lora_B)
        return y


class FusedBackend:
    """Decoding backend of the population engine for supported architectures."""

    preallocates = True  # the KV cache is allocated once per wave at its final size

    def __init__(self, model: nn.Module, layers: dict[str, PopulationLinear], pad_token_id: int):
        self.model = model
        self.config = model.config
        self.inner = model.model
        self.pad_token_id = pad_token_id
        self.population = self.rank = 0
        wrapped = {layer.base: layer for layer in layers.values()}
        self.groups: list[dict[str, Group]] = []
        for layer in self.inner.layers:
            groups = {}
            for key, (parent_name, names) in GROUPS.items():
                parent = getattr(layer, parent_name)
                modules = [getattr(parent, n) for n in names]
                linears = [m.base if hasattr(m, "base") else m for m in modules]
                groups[key] = Group(
                    weight=_concatenate_in_place(linears),
                    bias=_concatenated_bias(linears),
                    splits=[lin.out_features for lin in linears],
                    adapted=[wrapped.get(lin) for lin in linears],
                )
            self.groups.append(groups)
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.scaling = attn.scaling
        self.has_qk_norm = hasattr(attn, "q_norm")

    # -- adapters -------------------------------------------------------------------------------

    def set_adapters(self, population: int, rank: int) -> None:
        """Stack the wrapped layers' current factors per group (once per change of the population)."""
        self.population, self.rank = population, rank
        for groups in self.groups:
            for group in groups.values():
                parts = [(i, m) for i, m in enumerate(group.adapted) if m is not None and m.lora_A is not None]
                group.projections = len(parts)
                if not parts:
                    group.lora_A = group.lora_B = None
                    continue
                group.lora_A = torch.cat([m.lora_A for _, m in parts])
                rows = sum(m.lora_A.shape[0] for _, m in parts)
                group.lora_B = group.weight.new_zeros((rows, sum(group.splits)))
                offsets = [0, *torch.tensor(group.splits).cumsum(0).tolist()]
                r0 = 0
                for i, m in parts:
                    nr = m.lora_A.shape[0]
                    group.lora_B[r0 : r0 + nr, offsets[i] : offsets[i + 1]] = m.lora_B * m.scale
                    r0 += nr

    def _selectors(self, rows: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Each row's one-hot member block, tiled for groups with P adapted projections: [rows, 1, P·N·r]."""
        if rows is None:
            return {}
        counts = {g.projections for groups in self.groups for g in groups.values()}
        return {p: rows.repeat(1, p).unsqueeze(1) for p in counts if p}

    # -- backend protocol -----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], row_members: torch.Tensor | None,
                max_new_tokens: int) -> torch.Tensor:
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        ids, mask = left_pad(list(prompts), self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device).bool()
        n, width = ids.shape
        capacity = width + max_new_tokens
        self.k_cache = [torch.empty((n, self.kv_heads, capacity, self.head_dim), device=device, dtype=dtype)
                        for _ in self.groups]
        self.v_cache = [torch.empty_like(k) for k in self.k_cache]
        self.valid = torch.zeros((n, capacity), dtype=torch.bool, device=device)
        self.valid[:, :width] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.length = width
        self.rows = n
        self.selector = None
        if row_members is not None and self.population:
            self.selector = member_selector(row_members, self.population, self.rank, dtype)
        self.selectors = self._selectors(self.selector)
        logits = []
        chunk = max(1, PREFILL_TOKENS // width)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            logits.append(self._prefill_rows(ids[rows], mask[rows], positions[rows], rows))
        self.next_position = positions[:, -1] + 1
        return torch.cat(logits)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b, col = self.rows, self.length
        selectors = self.selectors
        x = self.inner.embed_tokens(tokens[:, None])
        position_ids = self.next_position[:, None]
        cos, sin = self.inner.rotary_emb(x, position_ids)
        self.valid[:b, col] = True
        valid = self.valid[:b, None, None, : col + 1]
        group_size = self.heads // self.kv_heads
        for i, (layer, groups) in enumerate(zip(self.inner.layers, self.groups)):
            q, k, v = self._qkv(layer, groups, x, cos, sin, selectors)
            self.k_cache[i][:b, :, col] = k[:, :, 0]
            self.v_cache[i][:b, :, col] = v[:, :, 0]
            q = q.reshape(b, self.kv_heads, group_size, self.head_dim)  # heads sharing a KV head as queries
            with sdpa_kernel(ATTENTION_BACKENDS):
                attn = F.scaled_dot_product_attention(
                    q, self.k_cache[i][:b, :, : col + 1], self.v_cache[i][:b, :, : col + 1],
                    attn_mask=valid, scale=self.scaling,
                )
            x = self._finish_layer(layer, groups, x, attn.reshape(b, 1, -1), selectors)
        self.length += 1
        self.next_position = self.next_position + 1
        return self._logits(x)

    def keep(self, index: torch.Tensor) -> None:
        """Compact the live rows to the front of every buffer, in place."""
        n, col = index.numel(), self.length
        for cache in (*self.k_cache, *self.v_cache):
            cache[:n, :, :col] = cache[index, :, :col]
        self.valid[:n, : col + 1] = self.valid[index, : col + 1]
        self.next_position = self.next_position[index]
        if self.selector is not None:
            self.selector = self.selector[index]
            self.selectors = self._selectors(self.selector)
        self.rows = n

    def close(self) -> None:
        self.k_cache = self.v_cache = []
        self.valid = self.selector = None
        self.selectors = {}

    # -- pieces ---------------------------------------------------------------------------------

    def _prefill_rows(self, ids, mask, positions, rows: slice) -> torch.Tensor:
        n, width = ids.shape
        selectors = self._selectors(None if self.selector is None else self.selector[rows])
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, positions)
        causal = torch.ones((width, width), dtype=torch.bool, device=ids.device).tril()
        # a padding query sees itself only, so no row of the mask is empty
        allowed = (causal & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)
        allowed = allowed[:, None]
        for i, (layer, groups) in enumerate(zip(self.inner.layers, self.groups)):
            q, k, v = self._qkv(layer, groups, x, cos, sin, selectors)
            self.k_cache[i][rows, :, :width] = k
            self.v_cache[i][rows, :, :width] = v
            with sdpa_kernel(ATTENTION_BACKENDS):
                attn = F.scaled_dot_product_attention(q, _repeat_kv(k, self.heads), _repeat_kv(v, self.heads),
                                                      attn_mask=allowed, scale=self.scaling)
            x = self._finish_layer(layer, groups, x, attn.transpose(1, 2).reshape(n, width, -1), selectors)
        return self._logits(x[:, -1:])

    def _qkv(self, layer, groups, x, cos, sin, selectors):
        b, t, _ = x.shape
        h = layer.input_layernorm(x)
        group = groups["qkv"]
        q, k, v = group(h, selectors).split(group.splits, dim=-1)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rotate(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, layer, groups, x, attn, selectors):
        x = x + groups["o"](attn, selectors)
        h = layer.post_attention_layernorm(x)
        gate, up = groups["gate_up"](h, selectors).split(groups["gate_up"].splits, dim=-1)
        return x + groups["down"](F.silu(gate) * up, selectors)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.inner.norm(x[:, -1])).float()


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, kv_heads, t, d] -> [b, heads, t, d] (prefill only: the efficient kernel has no GQA)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _rotate(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _concatenate_in_place(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight tensor for the group; each linear's weight becomes a view into it."""
    if len(linears) == 1:
        return linears[0].weight
    weight = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        lin.weight.data = weight[start : start + lin.out_features]
        start += lin.out_features
    return weight


def _concatenated_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])
