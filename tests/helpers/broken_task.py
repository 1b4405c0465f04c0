"""Tasks with a bug: loading their data raises, as an internal error of evolm would."""

from evolm.tasks import Task


class BrokenTask(Task):
    name = "broken"

    def load_split(self, split, source):
        raise RuntimeError("a bug in the data loader")

    def score(self, completion, example):
        raise AssertionError("never reached")


class CleanupFailsOnCtrlC(BrokenTask):
    """Ctrl-C lands mid-load and the cleanup it sets off fails, as torch's mode stack can when the
    Ctrl-C lands inside `from_pretrained`'s `torch.device` context."""

    def load_split(self, split, source):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("trying to pop from empty mode stack")


class OutOfMemoryTask(BrokenTask):
    """Loading its data asks the allocator for 32 TiB, which it refuses (a real allocation failure)."""

    def load_split(self, split, source):
        import torch

        torch.empty(2**45, dtype=torch.uint8)
