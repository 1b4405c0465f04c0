"""The question-answering tasks: field mapping, reference answers and the documented matchers."""

from __future__ import annotations

import json

import pytest

from evolm.tasks import Example, TaskError, load_task
from evolm.tasks.qa import choice_letter, final_number, normalize_answer, span_answer, token_f1


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("completion, expected", [
    ("The answer is 42.", 42), ("#### 1,234", 1234), ("so 3 + 4 = 7, and the answer is -7.5 apples", -7.5),
    ("12 eggs, then 40 + 2 = 42", 42), ("The answer is $1,000,000 in total, after 3 years", 1e6),
    ("no number here", None), ("Answer is: 18\nCheck: 9 + 9 = 18, 20", 18),
])
def test_final_number(completion, expected):
    assert final_number(completion) == expected


def test_gsm8k_scores_the_final_number_only(tmp_path):
    task = load_task("gsm8k")
    source = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Q1", "answer": "She has 48/2 = <<48/2=24>>24 left.\n#### 1,024"},
        {"question": "Q2", "answer": "18"},
    ])
    first, second = task.load_split("train", source)
    assert first.target == 1024 and second.target == 18
    assert task.answer_text(first) == "She has 48/2 = 24 left.\nThe answer is 1024."
    assert task.answer_text(second) == "The answer is 18."
    assert first.prompt[-1]["role"] == "user" and "Q1" in first.prompt[-1]["content"]
    assert task.score("The answer is 1024", first).correct
    assert task.score("1,024.0", first) == task.score("#### 1024", first)
    assert not task.score("1024 is tempting, but the answer is 1023.", first).correct
    assert task.score("The answer is 18. (I first thought 17)", second).correct
    assert task.score("18 or 19", second) == task.score("wrong", second)


def test_field_mapping_and_clear_errors(tmp_path):
    source = write_jsonl(tmp_path / "g.jsonl", [{"q": "What is 2+2?", "sol": "4"}])
    task = load_task("gsm8k", {"question_field": "q", "answer_field": "sol"})
    (example,) = task.load_split("train", source)
    assert example.target == 4 and "What is 2+2?" in example.prompt[-1]["content"]
    with pytest.raises(TaskError, match="no field 'question' or 'problem'.*question_field"):
        load_task("gsm8k").load_split("train", source)
    with pytest.raises(TaskError, match="bad task.options.*allowed: system_prompt, question_field"):
        load_task("gsm8k", {"questions": "q"})
    with pytest.raises(TaskError, match="not found"):
        load_task("gsm8k").load_split("train", str(tmp_path / "missing.jsonl"))
    system = load_task("gsm8k", {"question_field": "q", "answer_field": "sol", "system_prompt": "Be brief."})
    assert system.load_split("train", source)[0].prompt[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("completion, expected", [
    ("Let me think. The answer is (C).", "C"), ("Answer: B", "B"), ("C", "C"), (" (D) ", "D"),
    ("The answer is A. No wait, the answer is (D)", "D"), ("I think C is good", None),
    ("the answer is a trick question", None), ("The answer is (J).", None),  # only 4 options
])
def test_choice_letter_is_strict(completion, expected):
    assert choice_letter(completion, 4) == expected


def test_mmlu_pro_examples(tmp_path):
    task = load_task("mmlu-pro")
    source = write_jsonl(tmp_path / "m.jsonl", [
        {"question": "Pick", "options": ["x", "y", "z"], "answer": "B"},
        {"question": "Pick", "options": ["x", "y", "z"], "answer_index": 2},
    ])
    first, second = task.load_split("test", source)
    assert (first.target, second.target) == ("B", "C")
    assert "A. x\nB. y\nC. z" in first.prompt[-1]["content"]
    assert task.answer_text(first) == "The answer is (B)."
    assert task.score("The answer is (B).", first).correct and not task.score("B or C", first).correct


def test_squad_exact_match_and_f1(tmp_path):
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert token_f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)
    assert span_answer("\nAnswer: Denver Broncos\nbecause ...") == "Denver Broncos"
    task = load_task("squad")
    answers = {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}
    source = write_jsonl(tmp_path / "s.jsonl", [{"context": "C", "question": "Who won?", "answers": answers}])
    (example,) = task.load_split("test", source)
    assert task.answer_text(example) == "Denver Broncos"
    assert task.score("the broncos.", example).correct
    partial = task.score("the Denver team", example)
    assert not partial.correct and partial.reward == pytest.approx(0.5)


@pytest.mark.parametrize("name, fields", [("alpaca", ("instruction", "input", "output")),
                                          ("dolly", ("instruction", "context", "response"))])
def test_instruction_tasks_reward_overlap_without_a_verdict(tmp_path, name, fields):
    instruction, extra, output = fields
    source = write_jsonl(tmp_path / "i.jsonl", [{instruction: "Name a colour.", extra: "", output: "Blue is a colour."},
                                                {instruction: "Summarise.", extra: "Some text.", output: "Text."}])
    task = load_task(name)
    first, second = task.load_split("train", source)
    assert first.prompt[-1]["content"] == "Name a colour." and "Some text." in second.prompt[-1]["content"]
    assert task.answer_text(first) == "Blue is a colour."
    score = task.score("Blue.", first)
    assert score.correct is None and score.reward == pytest.approx(token_f1("Blue.", "Blue is a colour."))


def test_the_papers_gsm8k_file_loads(shared_data):
    task = load_task("gsm8k")
    examples = task.load_split("train", str(shared_data / "gsm8k_train.jsonl") + "[:5]")
    assert len(examples) == 5 and all(isinstance(e.target, float) for e in examples)
    assert task.score(f"The answer is {examples[0].target:g}.", examples[0]).correct


def test_the_papers_gsm8k_arrow_folder_loads(shared_data):
    pytest.importorskip("datasets")
    folder = shared_data / "es-at-scale" / "datasets" / "train" / "gsm_8k" / "train"
    examples = load_task("gsm8k").load_split("train", str(folder) + "[:3]")
    assert len(examples) == 3 and isinstance(examples[0], Example)
