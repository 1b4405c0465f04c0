"""Conciseness: answer in as many characters as a short reference answer (the ES paper's second task).

As in the paper's script, the question is fed as raw text (no chat template) and the reward is
-|len(completion) - len(target)| with nothing stripped. The paper's script measured the decoded prompt +
completion (generate returns both); evolm measures the completion alone, so rewards are not comparable
with the paper's absolute numbers, only with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evolm.tasks.base import Example, Score, Split, Task, TaskError, load_records

BUILTIN_DATA = Path(__file__).resolve().parents[1] / "data" / "conciseness.jsonl"


def length_reward(completion: str, target: str) -> float:
    return -float(abs(len(completion) - len(target)))


def normalized_reward(reward: float) -> float:
    """The paper's reward scaled to [0, 1]: -2000 -> 0, 0 -> 1, linear, clipped."""
    return min(1.0, max(0.0, 1.0 + reward / 2000.0))


class ConcisenessTask(Task):
    """Reward completions for matching the length of the reference answer.

    Data: `source` None → evolm's own 10 train / 20 test questions; otherwise any JSON/JSONL of
    {question, answer} or {prompt, target} records. Records with a `split` field are filtered by it.
    `chat=True` wraps each question as a user message for the tokenizer's chat template.
    """

    name = "conciseness"
    description = "Answer in as many characters as a short reference answer (ES paper, Qiu et al. 2025)"
    builtin_data = "evolm's own 10 train / 20 test short questions"

    def __init__(self, chat: bool = False):
        self.chat = chat

    def load_split(self, split: Split, source: str | None) -> list[Example]:
        records = load_records(source or str(BUILTIN_DATA), split)
        if any("split" in record for record in records):
            records = [record for record in records if record.get("split") == split]
        return [self._example(record, f"{source or BUILTIN_DATA} record {i}") for i, record in enumerate(records)]

    def _example(self, record: dict[str, Any], where: str) -> Example:
        question = record.get("question", record.get("prompt"))
        answer = record.get("answer", record.get("target"))
        if not isinstance(question, str) or answer is None:
            raise TaskError(f"conciseness {where}: needs 'question' and 'answer' (or 'prompt' and 'target')")
        prompt = [{"role": "user", "content": question}] if self.chat else question
        return Example(prompt=prompt, target=str(answer))

    def score(self, completion: str, example: Example) -> Score:
        return Score(length_reward(completion, example.target))

    def extra_metrics(self, scores: list[Score]) -> dict[str, float]:
        return {"normalized_reward": sum(normalized_reward(s.reward) for s in scores) / max(len(scores), 1)}
