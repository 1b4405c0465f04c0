"""A task with a bug: loading its data raises, as an internal error of evolm would."""

from evolm.tasks import Task


class BrokenTask(Task):
    name = "broken"

    def load_split(self, split, source):
        raise RuntimeError("a bug in the data loader")

    def score(self, completion, example):
        raise AssertionError("never reached")
