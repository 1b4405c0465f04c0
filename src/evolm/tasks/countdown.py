"""Countdown: reach a target with + - * / using each given number once (the ES paper's main task).

Prompt and reward follow Qiu et al. 2025 (arXiv 2509.24372) and their code: the prompt is the raw
text of the data's `context` field, fed without a chat template, ending in "<think>"; the reward is
0.1 × format + answer, computed on the completion alone, as the paper's vLLM script does.

Deviations, each on text the paper's original script would also mis-score:
- the answer is evaluated by a tiny arithmetic evaluator, not `eval`: `**` and `//` (which pass the
  paper's character filter) are rejected, so a completion cannot make scoring hang or use powers;
- the paper's Hugging Face script decoded prompt + completion and scored that, so the prompt's own
  "<think> </think>" and "<answer> … </answer>" texts earned format credit; evolm never scores the prompt;
- generation stops at "</answer>" (the task's stop string): models keep writing after their answer, which
  costs up to 15× the work and makes a format reward of 1.0 unreachable. `decoding.stop=[]` gives the
  paper's exact protocol.

Option `chat=true` (not in the paper): the instructions, without the raw prompt's trailing "Let me solve
this step by step.\n<think>", become the user turn of the tokenizer's chat template, and the reward is the
answer reward alone, since the completion no longer continues an opened "<think>". Instruction-tuned models
that close their thinking at once on the raw prompt reason more when asked this way.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections import Counter
from typing import Any

from evolm.tasks.base import Example, Score, Split, Task, TaskError, load_records

PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in your mind and then provide the "
    "user with the answer.Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    "Let me solve this step by step.\n<think>"
)

THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "</think>", "<answer>", "</answer>"
THINK_THEN_ANSWER = THINK_CLOSE + "\n" + ANSWER_OPEN
RAW_PROMPT_TAIL = "Let me solve this step by step.\n<think>"
ARITHMETIC = re.compile(r"^[0-9+\-*/() ]+$")  # as the paper's, `$` also lets one trailing newline through

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def make_prompt(numbers: list[int], target: Any) -> str:
    """The paper's `context` text; its numbers are printed as numpy prints an int array: '[ 2 54 17]'."""
    width = max(len(str(n)) for n in numbers)
    listed = " ".join(str(n).rjust(width) for n in numbers)
    return PROMPT.format(numbers=f"[{listed}]", target=target)


def format_reward(completion: str) -> float:
    """1.0 for '<think>…</think>\\n<answer>…</answer>' and nothing else, partial credit otherwise.

    The spec defines it with regular expressions on "<think>" + completion:
    `^<think>.*?</think>\\n<answer>.*?</answer>$` (DOTALL) for 1.0, else 0.1 for `<think>.*?</think>` plus 0.5
    for `<answer>.*?</answer>`. Their lazy matching backtracks quadratically on a degenerate completion (400 KB
    of "<answer>" took minutes), so the same conditions are checked here with a few linear str.find scans.
    """
    if _is_full_format(completion):
        return 1.0
    # The prompt's closing "<think>" opens the pair, so only "</think>" has to be in the completion.
    return (0.1 if THINK_CLOSE in completion else 0.0) + (0.5 if last_answer(completion) is not None else 0.0)


def _is_full_format(completion: str) -> bool:
    """Whether "<think>" + completion matches the full-format expression (whose `$` allows one final newline)."""
    body = completion.removesuffix("\n")
    if not body.endswith(ANSWER_CLOSE):
        return False
    return completion.find(THINK_THEN_ANSWER, 0, len(body) - len(ANSWER_CLOSE)) != -1


def last_answer(completion: str) -> str | None:
    """The text of the last <answer>…</answer> pair, pairs taken left to right without overlap as re.findall
    would take them; None when there is no pair."""
    last, start = None, 0
    while (opening := completion.find(ANSWER_OPEN, start)) != -1:
        closing = completion.find(ANSWER_CLOSE, opening + len(ANSWER_OPEN))
        if closing == -1:
            break
        last, start = (opening + len(ANSWER_OPEN), closing), closing + len(ANSWER_CLOSE)
    return completion[last[0] : last[1]] if last else None


def eval_arithmetic(expression: str) -> float | None:
    """The value of an integer expression in + - * / and parentheses; None for anything else."""
    try:
        return float(_value(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"not plain arithmetic: {type(node).__name__}")


def answer_reward(completion: str, numbers: list[int], target: float) -> float:
    """1.0 when the last <answer> uses exactly `numbers` (as a multiset) and equals `target` within 1e-5.

    Numbers are compared as digit strings (leading zeros dropped, as int() would): a completion may hold a
    number too long for int() to convert, which must score 0 rather than stop the run.
    """
    expression = last_answer(completion)
    if expression is None or not ARITHMETIC.match(expression):
        return 0.0
    used = Counter(digits.lstrip("0") or "0" for digits in re.findall(r"\d+", expression))
    if used != Counter(str(n) for n in numbers):
        return 0.0
    value = eval_arithmetic(expression)
    return 1.0 if value is not None and abs(value - float(target)) < 1e-5 else 0.0


def generate_problems(count: int, seed: int, max_target: int = 100) -> list[dict[str, Any]]:
    """`count` distinct problems, each with a solution: 3-4 numbers in 1-99 and a target in 1-max_target.

    The target comes from a random expression over all the numbers (+, -, *, exact /, every
    intermediate a positive integer), so every problem is reachable.
    """
    rng = random.Random(seed)
    seen: set[tuple] = set()
    problems = []
    while len(problems) < count:
        numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
        target, solution = _random_expression(numbers, rng)
        key = (tuple(sorted(numbers)), target)
        if 1 <= target <= max_target and key not in seen:
            seen.add(key)
            problems.append({"numbers": numbers, "target": target, "solution": solution})
    return problems


def _random_expression(numbers: list[int], rng: random.Random) -> tuple[int, str]:
    """Combine random pairs until one value is left; returns (value, expression)."""
    terms = [(n, str(n)) for n in numbers]
    while len(terms) > 1:
        a, a_text = terms.pop(rng.randrange(len(terms)))
        b, b_text = terms.pop(rng.randrange(len(terms)))
        choices = [("+", a + b), ("*", a * b)]
        if a > b:
            choices.append(("-", a - b))
        if a % b == 0:
            choices.append(("/", a // b))
        symbol, value = rng.choice(choices)
        terms.append((value, f"({a_text} {symbol} {b_text})"))
    return terms[0]


def _number(target: Any) -> int | float:
    value = float(target)  # OverflowError for an int beyond float's range, e.g. 10**400
    if not math.isfinite(value):
        raise ValueError("the target is not a finite number")
    return int(value) if value.is_integer() else value


class CountdownTask(Task):
    """Countdown numbers game, scored exactly as in the ES paper.

    Data: `source` None → the built-in generator (`seed`, `train_size`, `test_size`, `max_target`); the
    test problems come first in its stream, so they do not change with `train_size`, and no problem is in
    both splits. A path → the paper's JSON ({context, numbers, target, …}; the paper trains on `[:200]`
    and tests on `[-2000:]`). A hub id or `datasets` folder → its train split ({nums, target}), since
    Countdown datasets are one pool that slices divide.
    """

    stop_strings = ("</answer>",)

    name = "countdown"
    description = "Reach a target with + - * / using 3-4 given numbers once each (ES paper, Qiu et al. 2025)"
    hub_dataset = "Jiayi-Pan/Countdown-Tasks-3to4"
    builtin_data = "deterministic generator: 3-4 numbers in 1-99, reachable targets in 1-100"

    def __init__(self, seed: int = 0, train_size: int = 200, test_size: int = 200, max_target: int = 100,
                 chat: bool = False):
        self.seed, self.train_size, self.test_size, self.max_target = seed, train_size, test_size, max_target
        self.chat = chat

    def load_split(self, split: Split, source: str | None) -> list[Example]:
        if source is None:
            problems = generate_problems(self.test_size + self.train_size, self.seed, self.max_target)
            records = problems[: self.test_size] if split == "test" else problems[self.test_size :]
            source = "generator"
        else:
            records = load_records(source, "train")
        return [self._example(record, f"{source} record {i}") for i, record in enumerate(records)]

    def _example(self, record: dict[str, Any], where: str) -> Example:
        try:
            numbers = [int(n) for n in record["numbers" if "numbers" in record else "nums"]]
            target = _number(record["target"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TaskError(
                f"countdown {where}: needs integer 'numbers' (or 'nums') and a finite numeric 'target' that fits a "
                f"float: {exc!r}"
            ) from None
        prompt = record.get("context") or make_prompt(numbers, record["target"])
        if self.chat:
            prompt = [{"role": "user", "content": prompt.removesuffix(RAW_PROMPT_TAIL).rstrip()}]
        meta = {"numbers": numbers} | ({"solution": record["solution"]} if "solution" in record else {})
        return Example(prompt=prompt, target=target, meta=meta)

    def score(self, completion: str, example: Example) -> Score:
        answer = answer_reward(completion, example.meta["numbers"], example.target)
        if self.chat:
            return Score(answer, correct=answer == 1.0)
        return Score(0.1 * format_reward(completion) + answer, correct=answer == 1.0)
