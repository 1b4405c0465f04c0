"""The math tasks: boxed-answer extraction, math-verify equivalence, the grading time limit, prompts, data."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest

from evolm.tasks import BUILTIN, Example, TaskError, load_task
from evolm.tasks.catalog import describe_tasks
from evolm.tasks.math import INSTRUCTION, reference_answers, worked_solution
from evolm.tasks.math_grading import last_boxed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                reason="math-verify is not installed (pip install 'evolm[math]')")

EVALUATION_SETS = {"math500": 500, "aime": 30, "amc": 83, "minerva": 272, "olympiad_bench": 675}


@pytest.fixture(scope="module")
def math_task():
    return load_task("math", {"time_limit": 3.0})


def grade(task, completion: str, *references: str) -> bool:
    return task.score(completion, Example(prompt="", target=references)).correct


def grade_in_thread(task, completion: str, *references: str) -> list[bool]:
    """The verdict, graded on a thread that is not the main one (where SIGALRM is not available)."""
    verdicts: list[bool] = []
    worker = threading.Thread(target=lambda: verdicts.append(grade(task, completion, *references)))
    worker.start()
    worker.join(30)
    return verdicts


# --- extraction ---------------------------------------------------------------------------------------


def test_last_boxed_matches_braces_and_takes_the_last_box():
    assert last_boxed("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not nesting
    assert last_boxed("$\\boxed{\\boxed{7}}$") == "7"
    assert last_boxed("\\boxed{3} and at the end \\boxed{\\frac{1}{2") is None  # cut off: no final answer
    assert last_boxed("The answer is 3.") is None
    assert last_boxed("\\boxed{}") == ""


def test_last_boxed_is_linear_on_adversarial_text():
    text = "\\boxed{" + "{" * 200_000 + "\\boxed{" * 50_000
    started = time.perf_counter()
    assert last_boxed(text) is None
    assert time.perf_counter() - started < 1.0


# --- equivalence ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, reference", [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "0.5"),
    ("1/2", "\\frac12"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("18 \\text{ dollars}", "18"),
    ("\\$18", "18"),
    ("32348", "\\$32,\\!348"),  # a price in the reference, not a math delimiter
    ("1000", "1,000"),
    ("[1, 3)", "[1,3)"),
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("\\{7, 5, 3\\}", "3, 5, 7"),
    ("x = 3", "3"),
    ("90^\\circ", "90"),
    ("(2,6),(-6,6)", "$(-6,6)$, $(2,6)$"),
    ("142", "142"),
])
def test_equivalent_forms_are_correct(math_task, answer, reference):
    assert grade(math_task, f"Reasoning ... so the answer is $\\boxed{{{answer}}}$.", reference)


@pytest.mark.parametrize("answer, reference", [
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("(1, 3)", "[1, 3)"),  # the open interval is another set
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("1001", "1,000"),
    ("\\{3, 5\\}", "3, 5, 7"),
    ("(-6,6)", "$(-6,6)$, $(2,6)$"),  # half of the answer
])
def test_wrong_answers_are_wrong(math_task, answer, reference):
    assert not grade(math_task, f"\\boxed{{{answer}}}", reference)


def test_over_lenient_traps_are_wrong(math_task):
    assert not grade(math_task, "The answer is 18.", "18")  # the instruction asks for a box
    assert not grade(math_task, "18", "18")
    assert not grade(math_task, "\\boxed{}", "18")
    assert not grade(math_task, "\\boxed{18} was my first guess, but it is \\boxed{19}", "18")  # the last box counts
    assert not grade(math_task, "so the answer is \\boxed{18", "18")  # never closed
    example = math_task.load_split("train", None)[1]  # "Solve for $x$: $3x - 7 = 11$." -> 6
    assert not math_task.score("We need $3x - 7 = 11$, hence \\boxed{11}", example).correct  # a number from the prompt
    answer_in_prompt = Example(prompt=[{"role": "user", "content": "Is it \\boxed{6}?"}], target=("6",))
    assert not math_task.score("Yes, it is.", answer_in_prompt).correct  # only the completion is scored


def test_reward_is_one_or_zero_and_correct_gives_accuracy(math_task):
    example = Example(prompt="", target=("\\frac{5}{6}",))
    assert math_task.score("\\boxed{\\frac{10}{12}}", example) == math_task.score("\\boxed{5/6}", example)
    right, wrong = math_task.score("\\boxed{5/6}", example), math_task.score("\\boxed{6/5}", example)
    assert (right.reward, right.correct, wrong.reward, wrong.correct) == (1.0, True, 0.0, False)


def test_grading_works_off_the_main_thread(math_task):
    assert grade_in_thread(math_task, "\\boxed{4/2}", "\\sqrt{4}") == [True]  # math-verify's SIGALRM raises here


# --- the time limit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pathological", [
    "9^{9^{9^{9^{9}}}}",
    "(10^{10^{8}})!",
    "(" * 3000 + "1" + ")" * 3000,
])
def test_a_pathological_answer_is_wrong_within_the_time_limit(pathological):
    task = load_task("math", {"time_limit": 1.0})
    assert grade(task, "\\boxed{2}", "2") is True  # the worker is up: its start is not part of any limit
    started = time.perf_counter()
    assert grade(task, f"\\boxed{{{pathological}}}", "1") is False
    assert time.perf_counter() - started < 5.0
    started = time.perf_counter()
    assert grade_in_thread(task, f"\\boxed{{{pathological} + 1}}", "1") == [False]  # not the cached answer
    assert time.perf_counter() - started < 5.0
    assert grade(task, "\\boxed{\\frac{6}{3}}", "2") is True  # a fresh worker after the stuck one was killed


def test_time_limit_must_be_positive():
    with pytest.raises(TaskError, match="time limit"):
        load_task("math", {"time_limit": 0})


def test_missing_math_verify_tells_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "math_verify" else real_find_spec(name, *args))
    with pytest.raises(TaskError, match=r"pip install 'evolm\[math\]'"):
        load_task("math")


# --- prompts and data -----------------------------------------------------------------------------------


def test_registered_and_listed():
    assert {"math", "gsm8k-boxed", "gsm8k"} <= set(BUILTIN)
    rows = {row["name"]: row for row in describe_tasks()}
    assert "error" not in rows["math"] and rows["math"]["builtin_data"]


@pytest.mark.parametrize("name", ["math", "gsm8k-boxed"])
def test_builtin_data_is_chat_messages_with_the_instruction(name):
    task = load_task(name)
    train, test = task.load_split("train", None), task.load_split("test", None)
    assert len(train) >= 8 and len(test) == 4
    assert not {ex.prompt[-1]["content"] for ex in train} & {ex.prompt[-1]["content"] for ex in test}
    for example in train + test:
        assert [m["role"] for m in example.prompt] == ["user"]
        assert example.prompt[0]["content"].endswith("\n" + INSTRUCTION)
        assert task.score(f"\\boxed{{{example.target[0]}}}", example).correct
        assert task.answer_text(example).endswith(f"$\\boxed{{{example.target[0]}}}$.")


def test_system_prompt_option():
    example = load_task("math", {"system_prompt": "You are a careful mathematician."}).load_split("test", None)[0]
    assert [m["role"] for m in example.prompt] == ["system", "user"]


def test_gsm8k_answers_and_solutions_give_the_final_answer():
    assert reference_answers("3 * 5 = <<3*5=15>>15 stickers.\n#### 1,215") == ("1,215",)
    assert reference_answers("so $x = \\boxed{\\frac{1}{2}}$.") == ("\\frac{1}{2}",)
    assert reference_answers(142.0) == ("142",) and reference_answers(2.5) == ("2.5",)
    assert reference_answers(["9.6\n", "$9.6$"]) == ("9.6", "$9.6$")
    assert reference_answers("") == ()
    assert worked_solution("He has 3 * 5 = <<3*5=15>>15.\n#### 15") == "He has 3 * 5 = 15."
    assert worked_solution("18") is None


def test_record_shapes_and_field_errors(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        '{"question": "Q1", "answer": "It is 2 + 2 = <<2+2=4>>4.\\n#### 4"}\n'
        '{"problem": "Q2", "solution": "Half: $\\\\boxed{\\\\frac{1}{2}}$"}\n'
        '{"problem": "Q3", "answer": ["$3$", "three"]}\n'
    )
    task = load_task("gsm8k-boxed")
    first, second, third = task.load_split("train", str(data))
    assert first.target == ("4",) and task.answer_text(first) == "It is 2 + 2 = 4.\nThe final answer is $\\boxed{4}$."
    assert second.target == ("\\frac{1}{2}",) and task.answer_text(second) == "Half: $\\boxed{\\frac{1}{2}}$"
    assert third.target == ("$3$", "three") and task.score("\\boxed{3}", third).correct
    data.write_text('{"prompt": "Q", "answer": "1"}\n')
    with pytest.raises(TaskError, match="problem_field"):
        task.load_split("train", str(data))
    renamed = load_task("math", {"problem_field": "prompt"}).load_split("train", str(data))
    assert renamed[0].prompt[-1]["content"].startswith("Q\n")


@pytest.mark.parametrize("name, rows", EVALUATION_SETS.items())
def test_loads_the_es_at_scale_evaluation_suite(shared_data, math_task, name, rows):
    examples = math_task.load_split("test", str(shared_data / "es-at-scale/datasets/evaluation_suite/math" / name))
    assert len(examples) == rows
    assert all(example.target and all(example.target) for example in examples)
    first = examples[0]
    assert first.prompt[-1]["content"].endswith(INSTRUCTION)
    answer = first.target[0].strip("$")
    assert math_task.score(f"... therefore $\\boxed{{{answer}}}$", first).correct


def test_loads_the_gsm8k_training_rows(shared_data):
    task = load_task("gsm8k-boxed")
    examples = task.load_split("train", str(shared_data / "es-at-scale/datasets/train/gsm_8k/train") + "[:50]")
    from_jsonl = task.load_split("train", str(shared_data / "gsm8k_train.jsonl") + "[:50]")
    assert len(examples) == 50 and [e.target for e in examples] == [e.target for e in from_jsonl]
    assert task.score(f"\\boxed{{{examples[0].target[0]}}}", examples[0]).correct
