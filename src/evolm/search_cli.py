"""`evolm search` and `evolm analyze` commands: parse the command line, hand over to evolm.search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evolm.config import ConfigError
from evolm.tasks import TaskError


def search_command(
    config: Annotated[Optional[str], typer.Argument(help="YAML file or built-in preset (e.g. gsm8k).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. evolution.population=8")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue (or join as another worker) this run folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    quick_test: Annotated[bool, typer.Option("--quick-test", help="2 variants, 2 generations, 120 training examples.")] = False,
    pipeline_test: Annotated[bool, typer.Option("--pipeline-test", help="3 variants, 2 generations, 15 examples.")] = False,
) -> None:
    """Evolutionary search over LoRA hyperparameters (rank, alpha, learning rate, dropout, modules)."""
    from evolm.cli import split_config_and_overrides
    from evolm.runs import RunDirError
    from evolm.search import run_search

    config, overrides = split_config_and_overrides(config, overrides)
    if quick_test and pipeline_test:
        raise typer.BadParameter("choose one of --quick-test and --pipeline-test")
    mode = "quick" if quick_test else "pipeline" if pipeline_test else "full"
    try:
        run_dir = run_search(config, overrides, resume=str(resume) if resume else None, overwrite=overwrite, mode=mode)
    except (ConfigError, RunDirError, TaskError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; the current variant goes back to the queue; continue with --resume RUN_DIR", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"run folder: {run_dir}")


def analyze_command(
    run_dir: Annotated[Path, typer.Argument(help="A search run folder (finished or still running).")],
) -> None:
    """Figures (family tree, timeline, hyperparameter heatmap, survival, mutation effectiveness) and a report."""
    from evolm.search import analyze

    try:
        report = analyze(run_dir)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {report}")
