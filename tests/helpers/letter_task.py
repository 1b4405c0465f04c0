"""A task a tiny random model can learn within seconds: use the letter 'a' as often as possible."""

from evolm.tasks import Example, Score, Task, load_records


class LetterTask(Task):
    name = "letter-a"
    description = "share of characters of the completion that are the letter 'a'"

    def __init__(self, prompts: int = 4):
        self.prompts = prompts

    def load_split(self, split, source):
        """Built-in words, or the `prompt` field of a data source's records (for tests of data sources)."""
        if source is not None:
            return [Example(prompt=record["prompt"]) for record in load_records(source, split)]
        words = ["Hello", "Count", "Write", "Say", "Tell me", "Go"]
        offset = 0 if split == "train" else 3
        return [Example(prompt=words[(i + offset) % len(words)]) for i in range(self.prompts)]

    def score(self, completion, example):
        return Score(completion.count("a") / max(len(completion), 1), correct="a" in completion)


class NoLetterTask(LetterTask):
    """The opposite goal: as ES on LetterTask writes more 'a', this set's score falls, so its best θ is an early one."""

    name = "no-letter-a"

    def score(self, completion, example):
        return Score(1 - completion.count("a") / max(len(completion), 1), correct="a" not in completion)
