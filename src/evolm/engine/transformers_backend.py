"""The reference decoding backend: any causal LM through its own forward and a DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from evolm.engine.decoding import left_pad
from evolm.engine.layer import RowState


class TransformersBackend:
    """Runs the model's forward; the wrapped layers read each row's member from the shared RowState."""

    preallocates = False  # the cache grows, and is copied when rows are dropped

    def __init__(self, model: PreTrainedModel, rows: RowState, pad_token_id: int):
        self.model, self.rows, self.pad_token_id = model, rows, pad_token_id
        self.population = self.rank = 0

    def set_adapters(self, population: int, rank: int) -> None:
        self.population, self.rank = population, rank

    def prefill(self, prompts, row_members, max_new_tokens):
        param = next(self.model.parameters())
        ids, attention = left_pad(prompts, self.pad_token_id)
        self.attention = attention.to(param.device)
        positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        self.rows.set(row_members if self.population else None, self.population, self.rank, param.dtype)
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
        self.rows.keep(index)

    def close(self):
        self.rows.set(None, 0, 0, torch.float32)
        self.cache = None

    def _forward(self, input_ids, positions):
        output = self.model(
            input_ids=input_ids, attention_mask=self.attention, position_ids=positions,
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        )
        return output.logits[:, -1, :].float()
