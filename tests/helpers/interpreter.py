"""Run a script with Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported, hence a
subprocess): the kernels' tests on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_interpreted(code: str, *args: str) -> None:
    """Run `code` (which prints "ok" last when all its checks pass) under the interpreter."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
