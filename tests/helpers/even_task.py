"""gsm8k questions where a tiny random model is right about half the time: an answer counts as correct
when its length is even. Enough right answers to sample training targets from."""

from evolm.tasks import Score
from evolm.tasks.qa import GSM8KTask


class EvenLengthGSM8K(GSM8KTask):
    def score(self, completion, example):
        correct = len(completion) % 2 == 0
        return Score(float(correct), correct)


class NeverRightGSM8K(GSM8KTask):
    def score(self, completion, example):
        return Score(0.0, False)
