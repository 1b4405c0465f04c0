"""Question-answering tasks (gsm8k, mmlu-pro, squad, alpaca, dolly) with strict, documented matchers.

Each task reads a Hugging Face dataset when no source is given, or any local JSON / JSONL /
`datasets` folder; `task.options` maps the task's roles to other field names, e.g.
`question_field: problem`. Every example carries the reference answer text that supervised
fine-tuning learns and answer perplexity is measured on (`answer_text`).
"""

from __future__ import annotations

import re
import string
from abc import abstractmethod
from collections import Counter
from typing import Any

from evolm.tasks.base import Example, Messages, Score, Split, Task, TaskError, load_records


class QATask(Task):
    """Shared loading: field mapping, hub splits, chat-message prompts, reference answer text."""

    hub_config: str | None = None
    hub_splits: dict[str, str] = {"train": "train", "test": "test"}
    # role -> field names tried in order when the user gives no `<role>_field` option
    fields: dict[str, tuple[str, ...]] = {}
    optional_roles: frozenset[str] = frozenset()

    def __init__(self, system_prompt: str | None = None, **field_options: str):
        unknown = sorted(k for k in field_options if not k.endswith("_field") or k[:-6] not in self.fields)
        if unknown:
            allowed = ", ".join(["system_prompt"] + [f"{role}_field" for role in self.fields])
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        self.system_prompt = system_prompt
        self.field_names = {role: (field_options[f"{role}_field"],) if f"{role}_field" in field_options else names
                            for role, names in self.fields.items()}

    def load_split(self, split: Split, source: str | None) -> list[Example]:
        records = load_records(source, split) if source else self._hub_records(split)
        where = source or self.hub_dataset
        return [self.make_example(self._roles(record, f"{where}[{i}]")) for i, record in enumerate(records)]

    @abstractmethod
    def make_example(self, values: dict[str, Any]) -> Example:
        """An Example from the record's role values (question, answer, …)."""

    def answer_text(self, example: Example) -> str:
        """The reference completion: what fine-tuning learns and answer perplexity is measured on."""
        return example.meta["answer_text"]

    def messages(self, user: str) -> Messages:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": user}]

    def _roles(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        values = {}
        for role, names in self.field_names.items():
            name = next((n for n in names if n in record), None)
            if name is None:
                if role in self.optional_roles:
                    continue
                raise TaskError(
                    f"task '{self.name}': {where} has no field {' or '.join(map(repr, names))} for the {role}; "
                    f"fields present: {', '.join(record)}; map one with task.options.{role}_field=NAME"
                )
            values[role] = record[name]
        return values

    def _hub_records(self, split: Split) -> list[dict[str, Any]]:
        try:
            import datasets
        except ImportError:
            raise TaskError(
                f"task '{self.name}' without task.{split} downloads {self.hub_dataset}, which needs "
                "pip install 'evolm[datasets]'; or give a local file"
            ) from None
        try:
            ds = datasets.load_dataset(self.hub_dataset, self.hub_config, split=self.hub_splits[split])
        except Exception as exc:
            raise TaskError(f"task '{self.name}': could not load {self.hub_dataset} ({exc}); "
                            "give a local file") from exc
        return [dict(row) for row in ds]


# ----------------------------------------------------------------------------- gsm8k

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_MARKERS = ("####", "answer is")


def final_number(text: str) -> float | None:
    """The answer number of a completion: the first number after the last "####" (gsm8k's own marker),
    else after the last "answer is", else the last number in the text; thousands commas are ignored."""
    text = text.lower().replace(",", "")
    for marker in _MARKERS:
        at = text.rfind(marker)
        if at >= 0 and (found := _NUMBER.search(text, at + len(marker))):
            return float(found.group())
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def _plain(number: float) -> str:
    return str(int(number)) if number.is_integer() else str(number)


class GSM8KTask(QATask):
    """Grade-school maths. Correct when the completion's final number (see `final_number`) equals the
    reference numerically (relative tolerance 1e-6); reward 1 or 0. Only the final number counts,
    so a completion that merely mentions the right number along the way is wrong."""

    name = "gsm8k"
    description = "grade-school maths word problems; correct = final number equals the reference"
    hub_dataset = "openai/gsm8k"
    hub_config = "main"
    fields = {"question": ("question", "problem"), "answer": ("answer", "solution")}

    def make_example(self, values: dict[str, Any]) -> Example:
        answer = str(values["answer"])
        solution, marker, final = answer.rpartition("####")
        target = final_number(final if marker else answer)
        if target is None:
            raise TaskError(f"task '{self.name}': no number in the answer {answer[:80]!r}")
        reasoning = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop gsm8k's calculator annotations
        text = f"The answer is {_plain(target)}."
        prompt = (f"{values['question']}\n\nSolve the problem. End with the final answer as a number, "
                  "in the form 'The answer is N.'")
        return Example(self.messages(prompt), target, {"answer_text": f"{reasoning}\n{text}" if reasoning else text})

    def score(self, completion: str, example: Example) -> Score:
        predicted = final_number(completion)
        correct = predicted is not None and abs(predicted - example.target) <= 1e-6 * max(1.0, abs(example.target))
        return Score(float(correct), correct)


# ----------------------------------------------------------------------------- mmlu-pro

LETTERS = "ABCDEFGHIJ"
_STATED = re.compile(r"(?i:answer(?: is|:))\s*\(?([A-J])\)?(?![A-Za-z])")  # the letter itself in capitals
_ALONE = re.compile(r"^\s*\(?([A-J])\)?[.:]?\s*$")


def choice_letter(text: str, n_options: int = len(LETTERS)) -> str | None:
    """The chosen letter, strictly: the last "answer is X" / "answer: X" (X may be in parentheses), or
    a completion that is nothing but a letter. A letter merely appearing somewhere does not count."""
    stated = _STATED.findall(text)
    alone = _ALONE.match(text)
    letter = stated[-1] if stated else alone.group(1) if alone else None
    return letter if letter is not None and LETTERS.index(letter) < n_options else None


class MMLUProTask(QATask):
    """Multiple choice with up to ten options. Correct when `choice_letter` of the completion is the
    reference letter; reward 1 or 0. The hub dataset only has a test split worth training on, so
    its first half serves as training data and its second half as test data."""

    name = "mmlu-pro"
    description = "multiple-choice questions (A-J); correct = the stated letter"
    hub_dataset = "TIGER-Lab/MMLU-Pro"
    hub_splits = {"train": "test[:50%]", "test": "test[50%:]"}
    fields = {"question": ("question",), "options": ("options", "choices"),
              "answer": ("answer", "answer_index", "label")}

    def make_example(self, values: dict[str, Any]) -> Example:
        options = list(values["options"])
        if not 2 <= len(options) <= len(LETTERS):
            raise TaskError(f"task '{self.name}': {len(options)} options; expected 2 to {len(LETTERS)}")
        answer = values["answer"]
        if isinstance(answer, int) and 0 <= answer < len(options):
            letter = LETTERS[answer]
        elif str(answer).strip().upper() in LETTERS[: len(options)]:
            letter = str(answer).strip().upper()
        elif answer in options:
            letter = LETTERS[options.index(answer)]
        else:
            raise TaskError(f"task '{self.name}': answer {answer!r} is neither a letter, an index nor an option")
        listing = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
        prompt = (f"{values['question']}\n\nOptions:\n{listing}\n\n"
                  "Answer with the letter of the correct option, in the form 'The answer is (X).'")
        meta = {"answer_text": f"The answer is ({letter}).", "n_options": len(options)}
        return Example(self.messages(prompt), letter, meta)

    def score(self, completion: str, example: Example) -> Score:
        correct = choice_letter(completion, example.meta["n_options"]) == example.target
        return Score(float(correct), correct)


# ----------------------------------------------------------------------------- squad and overlap

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after `normalize_answer` (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def span_answer(completion: str) -> str:
    """The answer a completion gives to an extractive question: its first non-empty line, without
    a leading "Answer:"."""
    line = next((ln.strip() for ln in completion.splitlines() if ln.strip()), "")
    return re.sub(r"^(?:the\s+)?answer\s*(?:is|:)\s*", "", line, flags=re.IGNORECASE)


class SquadTask(QATask):
    """Extractive reading comprehension. Correct = exact match of `span_answer` with any reference
    after SQuAD normalisation; reward = the best token F1 against the references."""

    name = "squad"
    description = "reading comprehension; correct = exact match, reward = token F1"
    hub_dataset = "rajpurkar/squad"
    hub_splits = {"train": "train", "test": "validation"}
    fields = {"context": ("context",), "question": ("question",), "answers": ("answers", "answer")}

    def make_example(self, values: dict[str, Any]) -> Example:
        answers = values["answers"]
        if isinstance(answers, dict):  # the hub layout {text: [...], answer_start: [...]}
            answers = answers["text"]
        references = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        references = references or [""]  # SQuAD 2.0 unanswerable: the empty answer
        prompt = (f"Answer the question with a short span copied from the passage.\n\n"
                  f"Passage: {values['context']}\n\nQuestion: {values['question']}")
        return Example(self.messages(prompt), references, {"answer_text": references[0]})

    def score(self, completion: str, example: Example) -> Score:
        answer = span_answer(completion)
        exact = any(normalize_answer(answer) == normalize_answer(ref) for ref in example.target)
        return Score(max(token_f1(answer, ref) for ref in example.target), exact)


class InstructionTask(QATask):
    """Open-ended instructions. Reward = token F1 of the completion against the reference response;
    no right or wrong (correct is None), so search ranks these by reward and answer perplexity."""

    hub_splits = {"train": "train[:95%]", "test": "train[95%:]"}  # the hub data has one split
    fields = {"instruction": ("instruction",), "input": ("input", "context"), "output": ("output", "response")}
    optional_roles = frozenset({"input"})

    def make_example(self, values: dict[str, Any]) -> Example:
        extra = str(values.get("input") or "").strip()
        prompt = f"{values['instruction']}\n\n{extra}" if extra else str(values["instruction"])
        return Example(self.messages(prompt), str(values["output"]), {"answer_text": str(values["output"])})

    def score(self, completion: str, example: Example) -> Score:
        return Score(token_f1(completion, example.target))


class AlpacaTask(InstructionTask):
    name = "alpaca"
    description = "Stanford Alpaca instructions; reward = token F1 with the reference"
    hub_dataset = "tatsu-lab/alpaca"


class DollyTask(InstructionTask):
    name = "dolly"
    description = "Databricks Dolly 15k instructions; reward = token F1 with the reference"
    hub_dataset = "databricks/databricks-dolly-15k"
