"""What the docs point readers to is there: every run folder they name under docs/runs/ is in git and
loads as a run, and .gitignore lets such folders be committed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from evolm.config import ESRunConfig, read_source, validate
from evolm.grpo.config import GRPORunConfig
from evolm.runs import RunDir
from evolm.search.config import SearchRunConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NAMED_RUN = re.compile(r"docs/runs/[A-Za-z0-9][^\s`)\]'\"]*")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def run_folder(path: str) -> str:
    """The run folder a named path lies in (a file of a run names its run); the path itself if none does."""
    parts = Path(path).parts
    for end in range(len(parts), 2, -1):
        folder = Path(*parts[:end])
        if (REPO / folder / "config.yaml").is_file():
            return folder.as_posix()
    return path


def named_runs() -> list[str]:
    names = {m.group(0).rstrip("/.,;:") for doc in DOCS for m in NAMED_RUN.finditer(doc.read_text())}
    return sorted({run_folder(name) for name in names})


@pytest.fixture(autouse=True)
def _in_a_git_checkout():
    if git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout (an installed copy of the tests)")


@pytest.mark.parametrize("name", named_runs() or ["(none named)"])
def test_every_run_folder_the_docs_name_is_in_git_and_loads_as_a_run(name):
    if name == "(none named)":
        return
    tracked = git("ls-files", "--", name).stdout.split()
    assert f"{name}/config.yaml" in tracked, f"{name} is named in the docs but not committed"
    run = RunDir.open(REPO / name)
    config = read_source(run.config_file)
    schema = SearchRunConfig if run.database.is_file() else GRPORunConfig if "grpo" in config else ESRunConfig
    validate(config, schema)
    if schema is ESRunConfig:  # a GRPO run's checkpoint is the weights themselves: the docs say when it was kept
        assert run.load_checkpoint() is not None, f"{name} has no checkpoint to rebuild its model from"


def test_gitignore_ignores_top_level_runs_but_not_docs_runs():
    assert git("check-ignore", "-q", "runs/x/config.yaml").returncode == 0
    assert git("check-ignore", "-q", "docs/runs/x/config.yaml").returncode == 1
