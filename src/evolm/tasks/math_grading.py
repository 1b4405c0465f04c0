"""Grading of final math answers: the last \\boxed{} of a completion, checked for equivalence by math-verify.

Equivalence (0.5 = \\frac{1}{2} = 1/2, [1,3) as an interval, {3,5,7} as a set, "18 \\text{ dollars}" = 18,
x = 3 against 3 …) is decided by Hugging Face's `math-verify` on sympy objects, not by string matching.
The model's answer is read by math-verify's LaTeX grammar (latex2sympy2_extended) only; its plain-expression
extractor, which goes through sympy's `parse_expr` (an `eval`), is never given model text.

A time limit per answer: sympy can take forever on a model's `9^{9^{9^{9^{9}}}}`, and math-verify's own
limit is a SIGALRM, which only works on the main thread (elsewhere it raises ValueError) and cannot stop
work inside one C call. So grading runs in a worker process that is killed at the deadline; an answer
whose grading is killed counts as wrong, and the next answer starts a fresh worker. Verdicts are cached,
since a population of perturbed models mostly gives the same final answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

from evolm.tasks.base import TaskError

BOX = "\\boxed{"
INSTALL_HINT = "the math tasks grade answers with math-verify: pip install 'evolm[math]'"
STARTUP_SECONDS = 120.0  # importing sympy on a busy machine; not part of any answer's time limit


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched (\\{ and \\} are escaped braces, not
    nesting); None when there is no box or the last one is never closed (a cut-off answer).

    One backwards search and one forward scan: linear in the text, whatever the text is.
    """
    start = text.rfind(BOX)
    if start < 0:
        return None
    depth, i = 1, start + len(BOX)
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOX) : i]
        i += 1
    return None


def require_math_verify() -> None:
    if importlib.util.find_spec("math_verify") is None:
        raise TaskError(INSTALL_HINT)


class AnswerGrader:
    """Decides whether an answer equals one of the references, within `time_limit` seconds per answer.

    Thread-safe; one worker process, started on first use and after a kill; verdicts cached (LRU).
    """

    def __init__(self, time_limit: float = 5.0, cache_size: int = 65536):
        if time_limit <= 0:
            raise TaskError(f"the grading time limit must be positive, not {time_limit}")
        require_math_verify()
        self.time_limit = time_limit
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], bool] = OrderedDict()
        self._lock = threading.Lock()
        self._worker: _Worker | None = None

    def equivalent(self, answer: str, references: tuple[str, ...]) -> bool:
        if not answer.strip():
            return False
        if any(answer.strip() == ref.strip() for ref in references):  # identical text needs no sympy
            return True
        key = (answer, references)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            verdict = self._ask(answer, references)
            self._cache[key] = verdict
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return verdict

    def _ask(self, answer: str, references: tuple[str, ...]) -> bool:
        if self._worker is None:
            self._worker = _Worker()
        verdict = self._worker.ask({"answer": answer, "references": list(references)}, self.time_limit)
        if verdict is None:  # past the deadline: the worker is stuck, so it goes
            self._worker.kill()
            self._worker = None
            return False
        return verdict


class _Worker:
    """A `python -m evolm.tasks.math_grading` process: JSON lines in, JSON lines out, read by a thread so
    that a deadline can be kept from any thread, on any platform."""

    def __init__(self):
        package_root = str(Path(__file__).resolve().parents[2])  # the worker imports this very evolm
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "evolm.tasks.math_grading"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, text=True, encoding="utf-8", bufsize=1,
        )
        self.kill = weakref.finalize(self, _stop, self.process)  # also at exit, and when the grader goes
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_forward_lines, args=(self.process.stdout, self.replies), daemon=True).start()
        ready = self._reply(STARTUP_SECONDS)
        if ready != "ready":
            self.kill()
            raise TaskError(f"the math answer grader did not start ({ready or 'no reply'}); {INSTALL_HINT}")

    def _reply(self, timeout: float) -> str | None:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def ask(self, request: dict, time_limit: float) -> bool | None:
        """The verdict, or None when there is none within the time limit (or the worker died)."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            return None
        reply = self._reply(time_limit)
        return None if reply is None else json.loads(reply)


def _forward_lines(stream, replies: queue.Queue) -> None:
    """Each line of the worker's output into `replies`, then None at its end (the worker died or was killed)."""
    for line in stream:
        replies.put(line.rstrip("\n"))
    stream.close()
    replies.put(None)


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    try:
        process.stdin.close()
    except OSError:  # a pipe to a killed process may be broken; that is the point
        pass


def _serve() -> None:
    """The worker: math-verify without its SIGALRM limit (the parent keeps the time), its warnings
    silenced (stdout carries only replies). Ends when the parent closes stdin."""
    import logging

    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as exc:
        print(f"cannot import math_verify: {exc}", flush=True)
        return
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    latex_only = [LatexExtractionConfig(boxed_match_priority=0)]

    def parsed(reference: str) -> list:  # data writes "$(1,2)$, $(3,4)$" or "(1,2)"; "\\$18" is a price
        delimited = re.search(r"(?<!\\)\$", reference) is not None
        return parse(reference if delimited else f"${reference}$", extraction_config=latex_only, parsing_timeout=None)

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = parse(f"\\boxed{{{request['answer']}}}", extraction_config=latex_only, parsing_timeout=None)
        verdict = bool(answer) and any(verify(parsed(reference), answer, timeout_seconds=None)
                                       for reference in request["references"])
        print(json.dumps(verdict), flush=True)


if __name__ == "__main__":
    _serve()
