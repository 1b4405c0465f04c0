"""Built-in tasks: the paper's countdown prompt and reward, the generator, conciseness, loading, the registry."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from evolm.tasks import BUILTIN, Example, TaskError, load_records, load_task
from evolm.tasks.catalog import describe_tasks
from evolm.tasks.conciseness import ConcisenessTask, normalized_reward
from evolm.tasks.countdown import CountdownTask, answer_reward, eval_arithmetic, format_reward, last_answer, make_prompt

COUNTDOWN = CountdownTask()


def countdown_example(numbers, target) -> Example:
    return COUNTDOWN._example({"numbers": numbers, "target": target}, "test")


def countdown_score(completion: str, numbers=(44, 19, 35), target="98"):
    return COUNTDOWN.score(completion, countdown_example(list(numbers), target))


# --- countdown reward -------------------------------------------------------------------------------


def test_perfect_format_and_answer():
    score = countdown_score("44 + 19 = 63, 63 + 35 = 98</think>\n<answer>(44 + 19) + 35</answer>")
    assert score.reward == pytest.approx(1.1) and score.correct is True


def test_partial_format_credits():
    assert format_reward("thinking</think>\n<answer>1</answer>") == 1.0
    assert format_reward("thinking</think>") == pytest.approx(0.1)
    assert format_reward("no think close <answer>1</answer>") == pytest.approx(0.5)
    assert format_reward("thinking</think> <answer>1</answer>") == pytest.approx(0.6)  # no newline between
    assert format_reward("thinking</think>\n<answer>1</answer> and more") == pytest.approx(0.6)  # text after
    assert format_reward("nothing at all") == 0.0
    # correct answer without the full format: 0.1 * 0.6 + 1
    assert countdown_score("</think> <answer>44 + 19 + 35</answer>").reward == pytest.approx(1.06)


def test_wrong_missing_and_reused_numbers_get_no_answer_reward():
    numbers = [44, 19, 35]
    assert answer_reward("<answer>44 + 19 + 35</answer>", numbers, 98) == 1.0
    assert answer_reward("<answer>44 + 54</answer>", numbers, 98) == 0.0  # not the given numbers
    assert answer_reward("<answer>44 + 19</answer>", numbers, 63) == 0.0  # a number left out
    assert answer_reward("<answer>44 + 19 + 35 + 35 - 35</answer>", numbers, 98) == 0.0  # 35 used twice
    assert answer_reward("<answer>44 + 19 + 35</answer>", numbers, 97) == 0.0  # wrong value
    assert answer_reward("no answer tags", numbers, 98) == 0.0
    assert countdown_score("</think>\n<answer>44 + 19 + 34</answer>").correct is False


def test_repeated_numbers_count_as_a_multiset():
    assert answer_reward("<answer>6 * 6 - 30</answer>", [6, 6, 30], 6) == 1.0
    assert answer_reward("<answer>6 * 30 / 30</answer>", [6, 6, 30], 6) == 0.0


def test_division_and_non_integer_or_negative_targets():
    assert answer_reward("<answer>6 / 3 * 4</answer>", [6, 3, 4], 8) == 1.0
    assert answer_reward("<answer>(10 / (60 - 57)) * 80</answer>", [60, 10, 57, 80], "266.6666666666667") == 1.0
    assert countdown_score("</think>\n<answer>71 + 15 / 4</answer>", (71, 15, 4), "74.75").correct is True
    assert countdown_score("</think>\n<answer>69 - (55 + 25)</answer>", (69, 55, 25), "-11").correct is True
    assert answer_reward("<answer>5 / (3 - 3) + 1</answer>", [5, 3, 3, 1], 1) == 0.0  # division by zero


def test_unsafe_or_non_arithmetic_answers_are_rejected_without_running_them():
    numbers = [2, 3, 8]
    assert answer_reward("<answer>__import__('os').system('echo hi')</answer>", numbers, 0) == 0.0
    assert eval_arithmetic("__import__('os').getcwd()") is None
    assert eval_arithmetic("(lambda: 1)()") is None
    assert eval_arithmetic("2 ** 3") is None and eval_arithmetic("7 // 2") is None
    started = time.perf_counter()
    assert eval_arithmetic("9 ** 9 ** 9 ** 9") is None  # eval would never finish
    assert time.perf_counter() - started < 1.0
    assert eval_arithmetic("(1 + 2)(3)") is None and eval_arithmetic("1 2") is None and eval_arithmetic("") is None
    assert eval_arithmetic("-(3 - 5) * 2 / 8") == 0.5
    assert answer_reward("<answer>8 x 3 / 2</answer>", numbers, 12) == 0.0  # 'x' is not an operator
    assert answer_reward("<answer>8 * 3 / 2.0</answer>", numbers, 12) == 0.0  # '.' is not allowed, as in the paper


def test_last_answer_wins():
    right, wrong = "<answer>44 + 19 + 35</answer>", "<answer>44 - 19 + 35</answer>"
    assert countdown_score(f"x</think>\n{wrong} then {right}").correct is True
    assert countdown_score(f"x</think>\n{right} then {wrong}").correct is False


def test_only_the_completion_is_scored():
    """The prompt's own '<think> </think>' and example answer must earn nothing."""
    example = countdown_example([44, 19, 35], 98)
    assert COUNTDOWN.score("", example).reward == 0.0
    assert "<think> </think>" in example.prompt and "<answer> (1 + 2) / 3 </answer>" in example.prompt


def test_trailing_newline_in_answer_is_accepted_as_in_the_paper():
    assert answer_reward("<answer>44 + 19 + 35\n</answer>", [44, 19, 35], 98) == 1.0
    assert answer_reward("<answer>\n44 + 19 + 35</answer>", [44, 19, 35], 98) == 0.0


# The spec's definition of the format reward and of the scored answer, as regular expressions: the reference that
# the linear-time scans in countdown.py must agree with.
SPEC_FULL_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
SPEC_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
SPEC_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAG_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "1 + 2", "<", ">", "/", "</", "answer", "think",
              "</answer", "<answer", "</think>\n<answer>", "</answer>\n", "\n\n"]


def spec_format_reward(completion: str) -> float:
    text = "<think>" + completion
    if SPEC_FULL_FORMAT.match(text):
        return 1.0
    return (0.1 if SPEC_THINK.search(text) else 0.0) + (0.5 if SPEC_ANSWER.search(text) else 0.0)


def spec_last_answer(completion: str) -> str | None:
    answers = SPEC_ANSWER.findall(completion)
    return answers[-1] if answers else None


def test_format_and_answer_scans_agree_with_the_specs_regular_expressions():
    rng = random.Random(11)
    completions = ["", "\n", "</answer>", "</think>\n<answer></answer>", "</think>\n<answer></answer>\n\n"]
    completions += ["".join(rng.choice(TAG_PIECES) for _ in range(rng.randint(1, 14))) for _ in range(4000)]
    for completion in completions:
        assert format_reward(completion) == spec_format_reward(completion), completion
        assert last_answer(completion) == spec_last_answer(completion), completion
    assert {format_reward(c) for c in completions} == {0.0, 0.1, 0.5, 0.6, 1.0}  # every case was reached


@pytest.mark.parametrize("piece", ["<answer>", "</think>\n<answer>", "<answer></answer", "<think>", "</answer>"])
def test_a_megabyte_degenerate_completion_is_scored_quickly(piece):
    completion = piece * (1_000_000 // len(piece))
    started = time.perf_counter()
    countdown_score(completion)
    countdown_score(completion + "</answer>")
    assert time.perf_counter() - started < 1.0  # the regular expressions took minutes on 400 KB


def test_numbers_too_long_for_int_score_zero_instead_of_failing():
    huge = "9" * 5000
    assert countdown_score(f"</think>\n<answer>{huge} + 19 + 35</answer>").reward == pytest.approx(0.1)
    assert answer_reward(f"<answer>{huge}</answer>", [int("9" * 4000)], 1) == 0.0


# --- countdown prompt and data ----------------------------------------------------------------------


def test_prompt_matches_the_papers_context_for_every_record(shared_data):
    records = json.loads((shared_data / "countdown.json").read_text())
    assert len(records) == 2200
    for record in records:
        assert make_prompt(record["numbers"], record["target"]) == record["context"]


def test_records_without_context_get_the_papers_prompt(shared_data, tmp_path):
    records = json.loads((shared_data / "countdown.json").read_text())[-300:]
    hub_style = tmp_path / "hub.jsonl"
    hub_style.write_text("".join(json.dumps({"nums": r["numbers"], "target": r["target"]}) + "\n" for r in records))
    examples = COUNTDOWN.load_split("test", str(hub_style))
    assert [e.prompt for e in examples] == [r["context"] for r in records]
    assert isinstance(examples[0].prompt, str)  # raw text, no chat template, as the paper


def test_countdown_chat_option_asks_the_instructions_as_the_user_turn():
    raw = COUNTDOWN.load_split("test", None)[0]
    chat_task = load_task("countdown", {"chat": True})
    chat = chat_task.load_split("test", None)[0]
    [turn] = chat.prompt
    assert turn["role"] == "user" and raw.prompt.startswith(turn["content"])
    assert turn["content"].endswith("for example <answer> (1 + 2) / 3 </answer>.") and "<think>" not in turn["content"][-20:]
    solved = f"</think>\n<answer>{raw.meta['solution']}</answer>"
    assert COUNTDOWN.score(solved, raw).reward == pytest.approx(1.1)  # format + answer on the raw prompt
    assert chat_task.score(solved, chat).reward == 1.0 and chat_task.score(solved, chat).correct
    assert chat_task.score("</think>\n<answer>1</answer>", chat).reward == 0.0  # no format credit in chat


def test_paper_file_with_slices(shared_data):
    path = shared_data / "countdown.json"
    train = COUNTDOWN.load_split("train", f"{path}[:200]")
    test = COUNTDOWN.load_split("test", f"{path}[-2000:]")
    assert len(train) == 200 and len(test) == 2000
    first = json.loads(path.read_text())[0]
    assert train[0].prompt == first["context"] and train[0].meta["numbers"] == first["numbers"]
    assert train[0].target == 98
    solved = [e for e in train if e.meta.get("solution")]
    assert sum(COUNTDOWN.score(f"</think>\n<answer>{e.meta['solution']}</answer>", e).correct for e in solved) >= 190


def test_generator_targets_are_reachable_and_in_range():
    examples = COUNTDOWN.load_split("train", None) + COUNTDOWN.load_split("test", None)
    assert len(examples) == 400
    for e in examples:
        assert 3 <= len(e.meta["numbers"]) <= 4 and all(1 <= n <= 99 for n in e.meta["numbers"])
        assert isinstance(e.target, int) and 1 <= e.target <= 100
        assert e.prompt == make_prompt(e.meta["numbers"], e.target)
        assert COUNTDOWN.score(f"ok</think>\n<answer>{e.meta['solution']}</answer>", e).reward == pytest.approx(1.1)


def test_generator_is_deterministic_and_splits_are_disjoint():
    def problems(task, split):
        return [(e.prompt, e.target) for e in task.load_split(split, None)]

    train, test = problems(CountdownTask(seed=3), "train"), problems(CountdownTask(seed=3), "test")
    assert train == problems(CountdownTask(seed=3), "train")
    assert train != problems(CountdownTask(seed=4), "train")
    assert not set(train) & set(test)
    small = CountdownTask(seed=3, train_size=10, test_size=50)
    assert len(problems(small, "train")) == 10 and problems(small, "test") == test[:50]
    assert problems(CountdownTask(seed=3, train_size=5), "test") == test  # test does not move with train_size


def test_countdown_options_through_load_task():
    task = load_task("countdown", {"seed": 1, "train_size": 7})
    assert isinstance(task, CountdownTask) and len(task.load_split("train", None)) == 7
    with pytest.raises(TaskError, match="bad task.options"):
        load_task("countdown", {"no_such_option": 1})


def test_bad_countdown_record_names_the_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"numbers": [1, 2, 3], "target": 6}, {"numbers": [1, 2]}]))
    with pytest.raises(TaskError, match=r"bad\.json record 1"):
        COUNTDOWN.load_split("train", str(path))


@pytest.mark.parametrize(
    "data,expected",
    [
        ('[{"numbers": [1, 2], "target": %s}]' % (10**400), r"big\.json record 0: .*finite numeric 'target'"),
        ('[{"numbers": [1, 2], "target": 1e400}]', r"big\.json record 0: .*finite numeric 'target'"),
        ('[{"numbers": ["%s", 2], "target": 3}]' % ("7" * 5000), r"big\.json record 0: needs integer 'numbers'"),
        ('[{"numbers": [%s, 2], "target": 3}]' % ("7" * 5000), r"big\.json: a number has more than \d+ digits"),
    ],
)
def test_countdown_numbers_out_of_range_name_the_file_and_record(tmp_path, data, expected):
    path = tmp_path / "big.json"
    path.write_text(data)
    with pytest.raises(TaskError, match=expected) as error:
        COUNTDOWN.load_split("train", str(path))
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


# --- conciseness ----------------------------------------------------------------------------------


def test_conciseness_reward_is_negative_length_gap_of_the_completion():
    task = ConcisenessTask()
    example = Example(prompt="What is 2 + 2?", target="4")
    assert task.score("4", example).reward == 0.0
    assert task.score("It is 4", example).reward == -6.0
    assert task.score(" 4 ", example).reward == -2.0  # nothing is stripped, as in the paper
    assert task.score("", example).reward == -1.0
    assert task.score("4", example).correct is None


def test_normalized_reward():
    assert normalized_reward(0.0) == 1.0
    assert normalized_reward(-2000.0) == 0.0
    assert normalized_reward(-500.0) == pytest.approx(0.75)
    assert normalized_reward(-5000.0) == 0.0 and normalized_reward(10.0) == 1.0


def test_conciseness_builtin_data():
    task = ConcisenessTask()
    train, test = task.load_split("train", None), task.load_split("test", None)
    assert len(train) == 10 and len(test) == 20
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(isinstance(e.prompt, str) and e.target for e in train + test)  # raw text, as the paper
    chat = ConcisenessTask(chat=True).load_split("train", None)
    assert chat[0].prompt == [{"role": "user", "content": train[0].prompt}]


def test_conciseness_loads_both_schemas(shared_data):
    test = ConcisenessTask().load_split("test", str(shared_data / "conciseness" / "conciseness_test.json"))
    assert len(test) == 8 and test[0].prompt == "What is the capital of France?" and test[0].target == "Paris"
    train = ConcisenessTask().load_split("train", str(shared_data / "conciseness" / "train.jsonl"))
    assert [e.target for e in train] == ["8", "No"]


def test_conciseness_jsonl_with_slice_and_bad_record(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(6)))
    examples = ConcisenessTask().load_split("train", f"{path}[2:5]")
    assert [e.prompt for e in examples] == ["q2", "q3", "q4"]
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(TaskError, match="needs 'question' and 'answer'"):
        ConcisenessTask().load_split("train", str(path))


# --- loading and the registry ---------------------------------------------------------------------


def test_load_records_json_and_jsonl_slices(tmp_path):
    rows = [{"i": i} for i in range(10)]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_records(str(tmp_path / "a.json[:3]")) == rows[:3]
    assert load_records(str(tmp_path / "a.jsonl[-2:]")) == rows[-2:]
    assert load_records(str(tmp_path / "a.jsonl[4:6]")) == rows[4:6]
    assert load_records(str(tmp_path / "a.json")) == rows


@pytest.mark.parametrize("task", [CountdownTask(), ConcisenessTask()])
@pytest.mark.parametrize("name,text,item", [("nums.json", "[1, 2, 3]", "item 0 is a number"),
                                            ("mixed.jsonl", '{"a": 1}\n"text"\n', "item 1 is a string"),
                                            ("nested.json", '{"data": [{"a": 1}, [1]]}', "item 1 is a list")])
def test_data_that_is_not_records_names_the_file(task, tmp_path, name, text, item):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}: expected records \(JSON objects.*{item}"):
        task.load_split("train", str(path))


def test_invalid_json_lines_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(TaskError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_records(str(path))


@pytest.mark.parametrize("task", [CountdownTask(), ConcisenessTask()])
def test_missing_file_error_names_the_path(task, tmp_path):
    missing = tmp_path / "nowhere" / "data.json"
    with pytest.raises(TaskError, match="nowhere/data.json"):
        task.load_split("train", f"{missing}[:10]")


def test_custom_task_by_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        "from evolm.tasks import Example, Score, Task\n"
        "class Echo(Task):\n"
        "    name = 'echo'\n"
        "    def __init__(self, word='hi'):\n"
        "        self.word = word\n"
        "    def load_split(self, split, source):\n"
        "        return [Example(prompt='say ' + self.word, target=self.word)]\n"
        "    def score(self, completion, example):\n"
        "        return Score(float(completion == example.target), completion == example.target)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_tasks:Echo", {"word": "yo"})
    [example] = task.load_split("train", None)
    assert example.prompt == "say yo" and task.score("yo", example).correct is True
    with pytest.raises(TaskError, match="cannot import"):
        load_task("my_tasks:Missing")


def test_catalog_lists_tasks_and_survives_a_broken_module(tmp_path, monkeypatch):
    (tmp_path / "broken_task.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BUILTIN, "broken", "broken_task:Nope")
    monkeypatch.setitem(BUILTIN, "absent", "no_such_module_xyz:Nope")
    rows = {row["name"]: row for row in describe_tasks()}
    assert rows["countdown"]["hub_dataset"] == "Jiayi-Pan/Countdown-Tasks-3to4" and rows["countdown"]["builtin_data"]
    assert rows["conciseness"]["description"] and "error" not in rows["conciseness"]
    assert "boom at import" in rows["broken"]["error"]
    assert "no_such_module_xyz" in rows["absent"]["error"]
    assert set(BUILTIN) <= set(rows)
