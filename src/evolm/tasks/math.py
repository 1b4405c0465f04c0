"""Math reasoning for ES: `math` (competition problems) and `gsm8k-boxed` (grade-school word problems).

Prompt: the problem as a chat user message followed by "Please reason step by step, and put your final
answer within \\boxed{}." — the chain-of-thought instruction of Qwen2.5-Math-Instruct's model card (there
as the system message) and of DeepSeek-R1's usage notes (there in the user message, as here, so models
whose templates have no system role get it too). Reward 1 when the last \\boxed{} of the completion is
equivalent to the reference (see `math_grading`: math-verify, a time limit per answer), else 0; the
verdict gives accuracy. No box, an empty box or a box never closed is wrong, whatever the text says.

Why `gsm8k-boxed` beside the existing `gsm8k` rather than an option of it: `gsm8k` is the `evolm search`
task whose prompt asks for "The answer is N." and whose fine-tuning targets are written that way; the
boxed prompt and grader are a different protocol, and giving it its own name keeps results of the two
from ever being mixed up under one name.

Data: `source` None → a small built-in set written for evolm (`data/math.jsonl`, `data/gsm8k_boxed.jsonl`,
rows tagged with their split). Otherwise any JSON / JSONL / `datasets` folder, e.g. the ES-at-scale
evaluation suite: `{problem, answer}` rows, where the answer may be a string, a number or a list of
accepted strings; `{question, answer}` with gsm8k's "reasoning #### number"; `{problem, solution}`
(MATH), whose answer is the solution's last \\boxed{}. Rows with a `split` field are filtered by it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from evolm.tasks.base import Example, Messages, Score, Split, Task, TaskError, load_records
from evolm.tasks.math_grading import AnswerGrader, last_boxed

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATA = Path(__file__).resolve().parents[1] / "data"
PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "solution")


def reference_answers(value: Any) -> tuple[str, ...]:
    """The accepted final answers of a data row's answer value.

    A list gives several; a number its plain form (142.0 → "142"); a text with gsm8k's "####" what
    follows it; a worked solution its last \\boxed{}; any other text itself.
    """
    if isinstance(value, (list, tuple)):
        return tuple(answer for item in value for answer in reference_answers(item))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (str(int(value)) if float(value).is_integer() else str(value),)
    text = str(value)
    if "####" in text:
        text = text.rpartition("####")[2]
    elif (boxed := last_boxed(text)) is not None:
        text = boxed
    text = text.strip()
    return (text,) if text else ()


def worked_solution(value: Any) -> str | None:
    """The reasoning of a gsm8k answer or a MATH solution, for fine-tuning targets; None for a bare answer."""
    if not isinstance(value, str):
        return None
    if "####" in value:
        return re.sub(r"<<[^>]*>>", "", value.rpartition("####")[0]).strip() or None  # gsm8k's calculator notes
    return value.strip() if last_boxed(value) is not None else None


class MathTask(Task):
    """Competition math with a boxed final answer, graded by math-verify (see the module docstring).

    Options: `time_limit` seconds of grading per answer (past it the answer is wrong), `system_prompt`,
    and `problem_field` / `answer_field` for data whose fields have other names.
    """

    name = "math"
    description = "math problems; reward 1 when the last \\boxed{} answer is equivalent (math-verify) to the reference"
    builtin_data = "evolm's own 10 train / 4 test short math problems"
    builtin_file = DATA / "math.jsonl"

    def __init__(self, time_limit: float = 5.0, system_prompt: str | None = None,
                 problem_field: str | None = None, answer_field: str | None = None):
        self.grader = AnswerGrader(time_limit)
        self.system_prompt = system_prompt
        self.problem_fields = (problem_field,) if problem_field else PROBLEM_FIELDS
        self.answer_fields = (answer_field,) if answer_field else ANSWER_FIELDS

    def load_split(self, split: Split, source: str | None) -> list[Example]:
        where = source or str(self.builtin_file)
        records = load_records(where, split)
        if any("split" in record for record in records):
            records = [record for record in records if record.get("split") == split]
        return [self._example(record, f"{where}[{i}]") for i, record in enumerate(records)]

    def _example(self, record: dict[str, Any], where: str) -> Example:
        problem = self._field(record, self.problem_fields, "problem", where)
        answer = self._field(record, self.answer_fields, "answer", where)
        references = reference_answers(answer)
        if not references:
            raise TaskError(f"task '{self.name}': {where} has an empty answer {answer!r}")
        solution = worked_solution(answer) or worked_solution(record.get("solution"))
        final = f"The final answer is $\\boxed{{{references[0]}}}$."
        if solution is None:
            answer_text = final
        else:  # a MATH solution ends in its box; gsm8k's reasoning gets one
            answer_text = solution if last_boxed(solution) is not None else f"{solution}\n{final}"
        return Example(self.messages(str(problem)), references, {"answer_text": answer_text})

    def _field(self, record: dict[str, Any], names: tuple[str, ...], role: str, where: str) -> Any:
        name = next((n for n in names if n in record), None)
        if name is None:
            raise TaskError(f"task '{self.name}': {where} has no field {' or '.join(map(repr, names))} for the "
                            f"{role}; fields present: {', '.join(record)}; map one with task.options.{role}_field=NAME")
        return record[name]

    def messages(self, problem: str) -> Messages:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]

    def answer_text(self, example: Example) -> str:
        """A reference completion (the worked solution where the data has one), for `evolm search`."""
        return example.meta["answer_text"]

    def score(self, completion: str, example: Example) -> Score:
        answer = last_boxed(completion)
        correct = answer is not None and self.grader.equivalent(answer, example.target)
        return Score(float(correct), correct)


class GSM8KBoxedTask(MathTask):
    """GSM8K word problems with the boxed-answer prompt and math-verify grading of `math`."""

    name = "gsm8k-boxed"
    description = "grade-school word problems, boxed answer; reward 1 when equivalent (math-verify) to the reference"
    builtin_data = "evolm's own 8 train / 4 test word problems in gsm8k's format"
    builtin_file = DATA / "gsm8k_boxed.jsonl"
