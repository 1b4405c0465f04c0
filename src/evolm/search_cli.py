"""`evolm search` and `evolm analyze` commands: parse the command line, hand over to evolm.search.

The main CLI mounts them: app.command("search")(search_command), app.command("analyze")(analyze_command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def search_command(
    config: Optional[str] = typer.Argument(None, help="YAML config file or search preset name (gsm8k, …)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. evolution.population=8"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder, or join it as a worker."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
    quick_test: bool = typer.Option(False, "--quick-test", help="2 variants, 2 generations, 120 training examples."),
    pipeline_test: bool = typer.Option(False, "--pipeline-test", help="3 variants, 2 generations, 15 examples."),
) -> None:
    """Evolutionary search over LoRA hyperparameters (rank, alpha, learning rate, dropout, modules, epochs)."""
    from evolm.cli import split_config_and_overrides
    from evolm.config import ConfigError
    from evolm.runs import RunDirError
    from evolm.search import run_search
    from evolm.tasks import TaskError

    if quick_test and pipeline_test:
        raise typer.BadParameter("choose one of --quick-test and --pipeline-test")
    mode = "quick" if quick_test else "pipeline" if pipeline_test else "full"
    config, rest = split_config_and_overrides(config, overrides)
    try:
        run_dir = run_search(config, rest, resume=str(resume) if resume else None, overwrite=overwrite, mode=mode)
    except (ConfigError, RunDirError, TaskError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; the current variant goes back to the queue; continue with --resume RUN_DIR", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"run folder: {run_dir}")


def analyze_command(run_dir: Path = typer.Argument(..., help="A search run folder, finished or running.")) -> None:
    """Family tree, performance timeline, hyperparameter heatmap, survival, mutation effectiveness, report."""
    from evolm.config import ConfigError
    from evolm.search import analyze

    try:
        report = analyze(run_dir)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {report}")
