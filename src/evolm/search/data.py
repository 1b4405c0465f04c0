"""Examples for search as token ids: prompt + answer rows, their batches, and the answer tokens' loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from evolm.scoring import render
from evolm.tasks import Example


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    answer: list[int]


def encode(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[Example, str]], max_length: int,
           eos: int | None) -> list[Encoded]:
    """Prompt and answer ids of (example, answer text) pairs (plus `eos` when given, so fine-tuning learns
    to stop). Rows longer than max_length keep their answer (up to max_length - 1 tokens) and lose the
    start of the prompt."""
    rows = []
    for example, text in pairs:
        answer = tokenizer(text, add_special_tokens=False).input_ids
        answer = (answer + ([eos] if eos is not None else []))[: max_length - 1]
        rows.append(Encoded(render(tokenizer, example)[-(max_length - len(answer)):], answer))
    return rows


def collate(rows: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded prompt+answer rows, so every answer ends at the last position: the answer tokens of
    all rows lie in the last `width` positions, and logits are needed there only."""
    sequences = [r.prompt + r.answer for r in rows]
    length = max(map(len, sequences))
    width = max(len(r.answer) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, seq) in enumerate(zip(rows, sequences, strict=True)):
        input_ids[i, length - len(seq):] = torch.tensor(seq)
        attention[i, length - len(seq):] = 1
        answer_mask[i, width - len(row.answer):] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention, position_ids=positions, answer_mask=answer_mask)
    return {k: v.to(device) for k, v in batch.items()}


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of each row's answer tokens, and their count (prompt tokens never
    count). Only the last width+1 positions' logits are computed."""
    mask = batch["answer_mask"]
    width = mask.shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=width + 1).logits[:, :-1]
    targets = batch["input_ids"][:, -width:]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(-1), mask.sum(-1)
