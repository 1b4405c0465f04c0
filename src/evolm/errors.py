"""What the `evolm` command reports on one line, and where an internal failure's traceback goes."""

from __future__ import annotations

import errno
import tempfile
import time
import traceback
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (a field, a file, a value): the command prints the message, exits 2."""


# Failures of the disk or the folder, not of evolm: the user frees space or picks another folder.
STORAGE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or set output_dir on another disk; --resume RUN then "
                  "continues a run from its last checkpoint",
    errno.EDQUOT: "the disk quota is used up: free some space or set output_dir on another disk; --resume RUN "
                  "then continues a run from its last checkpoint",
    errno.EFBIG: "the file grew past the size this process may write (ulimit -f): raise the limit",
    errno.EROFS: "the file system is read-only: set output_dir to a writable folder",
    errno.EACCES: "no permission to write there: set output_dir to a folder you can write",
    errno.EPERM: "no permission to write there: set output_dir to a folder you can write",
}


def storage_problem(exc: BaseException) -> str | None:
    """A one-line description of an OSError the user's disk or folder caused, or None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ADVICE:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot write{where}: {exc.strerror}; {STORAGE_ADVICE[exc.errno]}"


def memory_problem(exc: BaseException) -> str | None:
    """A one-line description of an allocation the device or the host refused, or None for any other error.
    (By name: this module is imported before torch is.)"""
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, for CUDA and the other accelerators
        said = " ".join(text.split("Including non-PyTorch memory")[0].split()).replace("CUDA out of memory. ", "CUDA: ")
    elif isinstance(exc, (RuntimeError, MemoryError)) and "can't allocate memory" in text:  # torch's CPU allocator
        said = "the host refused an allocation: " + text.split("can't allocate memory: ")[-1].split(". Error")[0]
    elif isinstance(exc, MemoryError):
        said = "the host refused an allocation: out of memory"
    else:
        return None
    return (f"out of memory: {said.rstrip('.')}. Use a smaller model or model.dtype, less at once (a lower "
            "decoding.memory_fraction, batch size or max_new_tokens) or a device with more memory; a run's last "
            "checkpoint is kept, and --resume RUN continues it")


def ctrl_c_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C that `exc` was raised while unwinding from, if any. A Ctrl-C that lands inside
    `from_pretrained`'s `torch.device` context surfaces as torch's "trying to pop from empty mode
    stack": the user pressed Ctrl-C, and that is what the command reports."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def remember_log(exc: BaseException, path: Path) -> None:
    """Note on `exc` the log file its traceback went to, for the one line the command prints."""
    exc.evolm_log = path  # type: ignore[attr-defined]


def traceback_log(exc: BaseException) -> Path:
    """The log holding `exc`'s traceback: the run's log when the run wrote it there, else a new file."""
    path = getattr(exc, "evolm_log", None)
    if path is not None:
        return path
    path = Path(tempfile.gettempdir()) / f"evolm-error-{time.strftime('%Y%m%d-%H%M%S')}-{id(exc):x}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path
