"""A task a tiny random model can learn within seconds: use the letter 'a' as often as possible."""

from evolm.tasks import Example, Score, Task


class LetterTask(Task):
    name = "letter-a"
    description = "share of characters of the completion that are the letter 'a'"

    def __init__(self, prompts: int = 4):
        self.prompts = prompts

    def load_split(self, split, source):
        words = ["Hello", "Count", "Write", "Say", "Tell me", "Go"]
        offset = 0 if split == "train" else 3
        return [Example(prompt=words[(i + offset) % len(words)]) for i in range(self.prompts)]

    def score(self, completion, example):
        return Score(completion.count("a") / max(len(completion), 1), correct="a" in completion)
