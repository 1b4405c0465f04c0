"""Turning task examples into token ids and completions into scores."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from evolm.tasks import Example, Score, Task, TaskError


def render(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Raw text as is; chat messages through the tokenizer's template with the assistant turn opened."""
    if isinstance(example.prompt, str):
        return tokenizer(example.prompt).input_ids
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer("\n".join(m["content"] for m in example.prompt) + "\n").input_ids


def render_all(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[list[int]]:
    return [render(tokenizer, e) for e in examples]


def check_prompts(prompt_ids: Sequence[list[int]], examples: Sequence[Example], context: int | None,
                  what: str) -> None:
    """Refuse, naming the record, a prompt that is empty (nothing to continue) or fills the model's whole
    context (nothing can be generated, and a long one costs minutes a generation for nothing)."""
    for index, (ids, example) in enumerate(zip(prompt_ids, examples)):
        if not ids or (isinstance(example.prompt, str) and not example.prompt.strip()):
            raise TaskError(f"{what}: record {index} has an empty prompt; remove it or give it text")
        if context is not None and len(ids) >= context:
            raise TaskError(f"{what}: record {index}'s prompt is {len(ids)} tokens, and the model's context is "
                            f"{context}; shorten it or remove it (task.train / task.test slices can skip it)")


def score_all(task: Task, examples: Sequence[Example], texts: Sequence[str], offset: int = 0) -> list[Score]:
    """Scores of completions for the examples; `offset` makes error messages name the right example."""
    return [task.checked_score(text, ex, offset + i) for i, (text, ex) in enumerate(zip(texts, examples))]


def summarize(scores: Sequence[Score], task: Task | None = None) -> dict[str, float | None]:
    """Mean reward, accuracy where the task gives verdicts, and the task's own extra metrics."""
    verdicts = [s.correct for s in scores if s.correct is not None]
    metrics = {
        "reward": sum(s.reward for s in scores) / max(len(scores), 1),
        "accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
    }
    return metrics | (task.extra_metrics(list(scores)) if task else {})

