"""The reference decoding backend: any causal LM through its own forward and a DynamicCache, in waves."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from evolm.engine.decoding import left_pad
from evolm.engine.layer import Routing


def cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before (5.40 drops it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersBackend:
    """Runs the model's forward; the wrapped layers read each row's member from the routing object."""

    def __init__(self, model: PreTrainedModel, routing: Routing, pad_token_id: int):
        self.model, self.routing, self.pad_token_id = model, routing, pad_token_id
        self.cache_name = cache_argument(model)

    def prefill(self, prompts, row_members, max_new_tokens):
        param = next(self.model.parameters())
        ids, attention = left_pad(prompts, self.pad_token_id)
        self.attention = attention.to(param.device)
        positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        self.routing.route(row_members, param.dtype)
        self.cache = DynamicCache(config=self.model.config)
        self.next_position = positions[:, -1:] + 1
        return self._forward(ids.to(param.device), positions)

    def step(self, tokens):
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.attention.shape[0], 1))], dim=1)
        logits = self._forward(tokens[:, None], self.next_position)
        self.next_position = self.next_position + 1
        return logits

    def keep(self, index):
        self.attention, self.next_position = self.attention[index], self.next_position[index]
        self.cache.reorder_cache(index)
        self.routing.keep(index)

    def held_bytes(self) -> int:
        return 0  # nothing outlives a wave

    def close(self):
        self.routing.route(None, torch.float32)
        self.cache = None

    def _forward(self, input_ids, positions):
        output = self.model(
            input_ids=input_ids, attention_mask=self.attention, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache},
        )
        return output.logits[:, -1, :].float()
