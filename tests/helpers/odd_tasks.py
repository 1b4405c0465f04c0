"""Custom tasks as users write them, with their mistakes: a score that is no number, an __init__ that
raises; and a reward that ignores the completion (every member scores the same)."""

from helpers.letter_task import LetterTask

from evolm.tasks import Score


class TextScoreTask(LetterTask):
    name = "text-score"

    def score(self, completion, example):
        return "good"


class NoScoreTask(LetterTask):
    name = "no-score"

    def score(self, completion, example):
        return None


class FailingInitTask(LetterTask):
    name = "failing-init"

    def __init__(self, prompts: int = 4):
        raise KeyError("API_TOKEN")


class ConstantTask(LetterTask):
    name = "constant"

    def score(self, completion, example):
        return Score(1.0)
