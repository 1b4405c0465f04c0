"""The `evolm` command: parses arguments and hands over to the modules that do the work."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from evolm.errors import UserError, ctrl_c_behind, memory_problem, storage_problem, traceback_log


def flags_as_flags(params: list[click.Parameter]) -> list[click.Parameter]:
    """Boolean flags show bare in --help (typer's rich help would print `--overwrite <bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return flags_as_flags(super().get_params(ctx))


class TorchCommand(Command):
    """A command whose work imports torch: imported first, once its arguments are parsed (--help stays fast),
    keeping Ctrl-C and SIGTERM on the main thread."""

    def invoke(self, ctx: click.Context):
        import_torch_keeping_signals_on_the_main_thread()
        return super().invoke(ctx)


class Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return flags_as_flags(super().get_params(ctx))


def import_torch_keeping_signals_on_the_main_thread() -> None:
    """Import torch with Ctrl-C and SIGTERM blocked, so that the thread its import starts inherits them blocked
    and the kernel hands those signals to the main thread. There they interrupt what blocks (a read of a named
    pipe that never delivers); taken by torch's thread they would only set Python's flag, and the main thread
    would stay blocked for good. Threads started later, by the main thread, keep its (unblocked) mask."""
    if not hasattr(signal, "pthread_sigmask"):
        import torch  # noqa: F401
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Fine-tune language models by evolution.")
runs_app = typer.Typer(cls=Group, no_args_is_help=True, help="List and clean up run folders.")
app.add_typer(runs_app, name="runs")
console = Console(soft_wrap=True)  # a line stays one line (paths, counts), whatever the width; tables still fit it
stderr = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line, whatever the width

CONFIG_HELP = "YAML config file or preset name (countdown, conciseness, …)"
OVERRIDES_HELP = "Dotted key=value overrides, e.g. es.population=8 output_dir=runs/x"
NOT_STARTED = "interrupted before the run started: nothing was written (an existing output_dir is untouched)"


def _fail(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


@contextmanager
def reported_errors(*, user_errors: tuple[type[Exception], ...] = (), interrupted: str = "interrupted") -> Iterator[None]:
    """A command's failures as one line: a user's mistake (or a full or read-only disk) as `error: …`
    with exit 2, Ctrl-C as `interrupted` with exit 130, anything else as an internal error with the
    path of the log that holds its traceback, exit 1."""
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except (UserError, *user_errors) as exc:
        _fail(str(exc))
    except (KeyboardInterrupt, Exception) as exc:
        if ctrl_c_behind(exc):  # a Ctrl-C, or an error raised while unwinding from one
            stderr.print(interrupted)
            raise typer.Exit(130) from None
        problem = storage_problem(exc) or memory_problem(exc)
        if problem:
            _fail(problem)
        summary = (str(exc).splitlines() or [""])[0]
        stderr.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(summary)} "
                     f"(the traceback is in {traceback_log(exc)}; please report it)")
        raise typer.Exit(1) from None


def split_config_and_overrides(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """`evolm es --resume RUN key=value` puts the first override where the config would go."""
    rest = list(overrides or [])
    if config is not None and "=" in config:
        return None, [config, *rest]
    return config, rest


BOOKKEEPING = ("generation", "step", "set", "seconds", "completions")


def outcome_line(root: Path, summary: dict) -> str:
    """`done: RUN  test: reward 0.01 → 0.41, accuracy 0.01 → 0.41 (step 124, 1,106 training s)`."""
    base, final = summary.get("base") or {}, summary.get("final") or {}
    if not final:
        return f"done: {root}"
    changes = [f"{k} {base[k]:.4g} → {v:.4g}" if isinstance(base.get(k), (int, float)) else f"{k} {v:.4g}"
               for k, v in final.items() if k not in BOOKKEEPING and isinstance(v, (int, float))]
    when = next((f"{k} {final[k]}" for k in ("generation", "step") if k in final), "")
    seconds = final.get("seconds", 0)
    return (f"done: {root}  {final.get('set', 'test')}: {', '.join(changes) or 'no metrics'} "
            f"({when}, {f'{seconds:,.0f}' if seconds >= 10 else f'{seconds:.2g}'} training s)")


def comparison_line(counts: dict[str, int], p: float | None) -> str:
    """Per-example counts and the sign test, as `evaluate` and `compare` print them."""
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()) + (
        "" if p is None else f"; sign test p = {p:.3g}")


@app.command("es", cls=TorchCommand)
def es_command(
    config: Optional[str] = typer.Argument(None, help=CONFIG_HELP),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
) -> None:
    """Evolution Strategies in weight space: a population of perturbed models (a LoRA adapter, or the weights with low-rank or dense noise), scored together."""
    from evolm.es.runner import run_es

    config, rest = split_config_and_overrides(config, overrides)
    with reported_errors(user_errors=(FloatingPointError,), interrupted=NOT_STARTED):
        run, summary = run_es(config, rest, resume=str(resume) if resume else None, overwrite=overwrite)
    if summary.get("status") == "interrupted":
        when = "" if summary.get("generations") else " before its first generation"
        console.print(f"interrupted{when}; resume with: evolm es --resume {run.root}")
        raise typer.Exit(130)
    if summary.get("stopped_by_max_seconds"):
        console.print(f"es.max_seconds reached after {summary['generations']} generations; continue with: "
                      f"evolm es --resume {run.root} es.max_seconds=…")
    elif resume and summary.get("generations_this_session") == 0:
        console.print(f"nothing to do: the run has done its {summary['generations']} generations (es.generations); "
                      f"continue with: evolm es --resume {run.root} es.generations=…")
    console.print(outcome_line(run.root, summary), markup=False)


@app.command("grpo", cls=TorchCommand)
def grpo_command(
    config: Optional[str] = typer.Argument(None, help="YAML config file or preset name (countdown, conciseness: "
                                           "the es preset's model, task, decoding and eval)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted key=value overrides, e.g. grpo.steps=50"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
) -> None:
    """GRPO through TRL on the same model, task, prompts and evaluation as `evolm es` (needs evolm[rl])."""
    from evolm.grpo.loop import run_grpo

    config, rest = split_config_and_overrides(config, overrides)
    with reported_errors(interrupted=NOT_STARTED):
        run, summary = run_grpo(config, rest, resume=str(resume) if resume else None, overwrite=overwrite)
    if summary.get("status") == "interrupted":
        console.print(f"interrupted after step {summary.get('steps')}; resume with: evolm grpo --resume {run.root}")
        raise typer.Exit(130)
    if summary.get("status") == "diverged":
        console.print(outcome_line(run.root, summary), markup=False)
        stderr.print(f"diverged at step {summary.get('steps')}: more than grpo.max_skipped_updates steps in a row had "
                     f"non-finite gradients, so training stopped; {run.root} holds the last finite θ (scored above). "
                     "Try a lower grpo.learning_rate or grpo.max_grad_norm, or float32 (model.dtype=float32).")
        raise typer.Exit(1)
    if resume and summary.get("steps_this_session") == 0:
        budget = "grpo.max_seconds" if summary.get("stopped_by_max_seconds") else "grpo.steps"
        console.print(f"nothing to do: the run has spent its {budget} at step {summary.get('steps')}; continue "
                      f"with: evolm grpo --resume {run.root} {budget}=…")
    console.print(outcome_line(run.root, summary), markup=False)


@app.command("evaluate", cls=TorchCommand)
def evaluate_command(
    adapter: Optional[Path] = typer.Option(None, "--adapter", exists=True, help="PEFT adapter folder, evolved model "
                                           "folder, or run folder (its export, with the run's settings); none: "
                                           "--model alone."),
    task: str = typer.Option(..., "--task", help="Task name or module:Class."),
    compare: bool = typer.Option(False, "--compare", help="Also score the base model and compare per example."),
    against: Optional[Path] = typer.Option(None, "--against", exists=True, help="Compare per example with this "
                                           "model instead of the base (adapter, model or run folder, e.g. an ES run "
                                           "against a GRPO run), with the sign test."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Data source (path, PATH[a:b], datasets folder "
                                             "or dataset id), or NAME=SOURCE; repeat to score several sets."),
    split: str = typer.Option("test", "--split"),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the one the adapter or "
                                        "model folder records); alone, the model to score."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Default 1024, or the run's."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeat for several); default: "
                                             "the task's own, or the run's."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Task option KEY=VALUE, e.g. chat=true."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    samples: int = typer.Option(1, "--samples", min=1,
                                help="Sampled answers per example (needs --temperature); adds pass@k."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the full report (with texts) as JSON."),
    kl: bool = typer.Option(False, "--kl", help="Also KL(model ‖ base) along the model's own completions, per "
                            "set (adapter_metrics kl, kl_per_token): how far training moved it."),
) -> None:
    """Score an adapter on a task; with --compare (or --against B), list improvements, regressions and both-wrong
    cases against the base (or B)."""
    from evolm.config import apply_overrides
    from evolm.evaluation import EvalOptions, evaluate_adapter, load_data_sets, named_sources, resolve_run_folder
    from evolm.runs import RunDir

    with reported_errors(user_errors=(ValueError, FileNotFoundError)):
        options = EvalOptions(task=task, split=split, model=model, limit=limit,
                              max_new_tokens=max_new_tokens or 1024, temperature=temperature, samples=samples,
                              device=device, dtype=dtype, stop=stop or None,
                              task_options=apply_overrides({}, option or []) or None, kl=kl)
        if adapter is not None and RunDir(adapter).config_file.is_file():
            adapter, options = resolve_run_folder(adapter, options)
            if max_new_tokens or stop:
                options.max_new_tokens, options.stop = max_new_tokens or options.max_new_tokens, stop or options.stop
            console.print(f"scoring {adapter} with the run's settings: max_new_tokens={options.max_new_tokens}, "
                          f"stop={options.stop}")
        if against is not None and RunDir(against).config_file.is_file():
            against, _ = resolve_run_folder(against, options)
        sets = load_data_sets(options, named_sources(data) if data else {"test": None})
        report = evaluate_adapter(adapter, options, compare=compare, sets=sets, against=against)
    sizes = ", ".join(f"{name} ({result['examples']} examples)" for name, result in report["sets"].items())
    table = Table(title=f"{task}: {sizes}")
    table.add_column("set")
    table.add_column("model")
    table.add_column("mean reward", justify="right")
    table.add_column("accuracy", justify="right")
    pass_at = f"pass_at_{samples}"
    if samples > 1:
        table.add_column(f"pass@{samples}", justify="right")
    table.add_column("tokens", justify="right")  # mean generated tokens per completion
    table.add_column("s", justify="right")  # seconds generating the set
    for set_name, result in report["sets"].items():
        reference = ("base", result.get("base_metrics")) if against is None else (str(against),
                                                                                  result.get("against_metrics"))
        for name, metrics in (reference, (report["kind"], result["adapter_metrics"])):
            if metrics:
                cells = [metrics["accuracy"]] + ([metrics[pass_at]] if samples > 1 else [])
                table.add_row(set_name, name, f"{metrics['reward']:.4f}",
                              *("-" if c is None else f"{c:.2%}" for c in cells),
                              f"{metrics['completion_tokens']:.1f}", f"{metrics['generate_seconds']:.1f}")
    console.print(table)
    for set_name, result in report["sets"].items():
        if "comparison" in result:
            console.print(f"{set_name}: {comparison_line(result['comparison'], result['sign_test_p'])}")
        if "kl" in result["adapter_metrics"]:
            kl = result["adapter_metrics"]
            console.print(f"{set_name}: KL to the base {kl['kl']:.4g} a completion, {kl['kl_per_token']:.4g} a token")
    if output:
        output.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {output}")


@app.command("export", cls=TorchCommand)
def export_command(
    run_dir: Path = typer.Argument(..., help="An ES run folder."),
    out: Path = typer.Argument(..., help="Folder to write: a PEFT adapter (lora) or a Hugging Face model folder."),
    device: Optional[str] = typer.Option(None, "--device", help="Default: the run's (replay on the device the run "
                                         "used gives its weights bit for bit)."),
    model: Optional[str] = typer.Option(None, "--model", help="The run's base model, where it lives now "
                                        "(default: the path in the run's config)."),
    best: bool = typer.Option(False, "--best", help="The θ that scored best on eval.keep_best's set, not the last."),
    generation: Optional[int] = typer.Option(None, "--generation", help="θ after this many generations, not the "
                                             "last (e.g. at the training seconds another run had: see the "
                                             "run's evaluations)."),
) -> None:
    """Rebuild a run's θ from its small checkpoint and write it as an adapter or a model folder."""
    from evolm.es.runner import export_run

    with reported_errors(user_errors=(ValueError,)):
        console.print(f"wrote {export_run(run_dir, out, device, best=best, model=model, generation=generation)}")


@app.command("search", cls=TorchCommand)
def search_command(
    config: Optional[str] = typer.Argument(None, help="YAML config file or search preset name (gsm8k, …)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. evolution.population=8"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder, or join it as a worker."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output_dir."),
    quick_test: bool = typer.Option(False, "--quick-test", help="2 variants, 2 generations, 120 training examples."),
    pipeline_test: bool = typer.Option(False, "--pipeline-test", help="3 variants, 2 generations, 15 examples."),
) -> None:
    """Evolutionary search over LoRA hyperparameters (rank, alpha, learning rate, dropout, modules, epochs)."""
    from evolm.search import run_search

    if quick_test and pipeline_test:
        raise typer.BadParameter("choose one of --quick-test and --pipeline-test")
    mode = "quick" if quick_test else "pipeline" if pipeline_test else "full"
    config, rest = split_config_and_overrides(config, overrides)
    with reported_errors(interrupted="interrupted; a variant in progress goes back to the queue; continue "
                                     "with --resume RUN_DIR (before the run folder exists, nothing was written)"):
        run_dir = run_search(config, rest, resume=str(resume) if resume else None, overwrite=overwrite, mode=mode)
    console.print(f"run folder: {run_dir}")


@app.command("analyze", cls=TorchCommand)
def analyze_command(
    run_dirs: list[Path] = typer.Argument(..., help="A run folder (ES, GRPO or search), finished or running; "
                                          "several ES and GRPO runs with --out: compared on one clock."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write compare_time.png, compare_completions.png and "
                                       "compare.md of the runs here."),
):
    """Figures of a run and a table of each evaluation set at the base, the last and the best θ; for a search the
    family tree, survival, mutation effects and a Markdown report; for several runs, their test metric against
    training seconds and sampled completions."""
    from evolm.runs import RunDir

    with reported_errors():
        if out is not None or len(run_dirs) > 1:
            from evolm.comparison import compare_runs

            if out is None:
                raise UserError("several runs are compared into a folder: add --out DIR")
            for path in compare_runs(run_dirs, out):
                console.print(f"wrote {path}")
            return
        run_dir = run_dirs[0]
        if RunDir(run_dir).database.is_file():
            from evolm.search import analyze

            console.print(f"report: {analyze(run_dir)}")
            return
        from evolm.reports import evaluations_table, write_figures

        RunDir.open(run_dir)
        for path in write_figures(run_dir):
            console.print(f"wrote {path}")
        table = evaluations_table(run_dir)
        if table:
            console.print(table, markup=False, highlight=False)


@app.command("compare", cls=TorchCommand)
def compare_command(
    first: Path = typer.Argument(..., help="An `evolm evaluate --output` report (.json or .json.gz) or a run "
                                 "folder's completions file (RUN/results/completions[_SET]_genG.jsonl, or "
                                 ".jsonl.gz)."),
    second: Path = typer.Argument(..., help="The same kinds; compared against FIRST."),
    set_name: Optional[str] = typer.Option(None, "--set", help="The set of a report that has several."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the comparison as JSON."),
) -> None:
    """Two scored models per example, from what was saved (no model loads): the examples both answered, each
    one's metric there, and SECOND against FIRST with the sign test (e.g. an ES model's report against a GRPO
    run's completions, after the GRPO model is gone)."""
    from evolm.comparison import compare_outcomes, read_outcomes

    with reported_errors(user_errors=(ValueError, FileNotFoundError)):
        result = compare_outcomes(read_outcomes(first, set_name), read_outcomes(second, set_name))
    if not result["sources_recorded"]:
        console.print("the data source is not recorded on both sides: paired by example index alone")
    for side in ("first", "second"):
        found = result[side]
        console.print(f"{side}: {found['label']}: {found['metric']} on the {result['examples']} shared examples "
                      f"(of {found['examples']})")
    line = comparison_line(result["comparison"], result["sign_test_p"])
    console.print(f"second against first: {line}")
    if output:
        output.write_text(json.dumps(result, indent=2))
        console.print(f"comparison written to {output}")


@runs_app.command("list", cls=TorchCommand)
def runs_list_command(
    root: Path = typer.Argument(Path("runs"), help="Folder holding run folders."),
    cleanup: bool = typer.Option(False, "--cleanup", help="Delete all but the --keep most recent runs."),
    keep: int = typer.Option(5, "--keep", min=0),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
) -> None:
    """List runs (newest first); with --cleanup remove older ones."""
    from evolm.metrics import headline_metric
    from evolm.runs import RUN_MARKER, cleanup_candidates, cleanup_runs, format_age, list_runs

    with reported_errors():
        runs = list_runs(root)
    table = Table(title=f"runs under {root}")
    longest = max((len(r["path"]) for r in runs), default=4)
    table.add_column("path", no_wrap=True, min_width=longest)  # whole, or two runs could look alike
    for col in ("status", "generations", "last mean fitness", "final", "size", "modified"):
        table.add_column(col)
    for r in runs:
        metric = headline_metric(r["final"])[1] if r["final"] else None
        table.add_row(r["path"], r["status"], str(r["generations"]),
                      "-" if r["last_mean_fitness"] is None else f"{r['last_mean_fitness']:.4g}",
                      "-" if metric is None else f"{metric:.4g}", f"{r['size_mb']:.1f} MB", format_age(r["modified"]))
    # wider than the terminal rather than a cut path or cut headers: the other columns need about 80 characters
    # (a console's print clamps its width to the console's, hence a console of that width)
    Console(width=max(console.width, longest + 80)).print(table, crop=False)
    if cleanup:
        doomed, unmarked = cleanup_candidates(runs, keep)
        if unmarked:
            console.print(f"not deleting {len(unmarked)} run(s) of an older evolm (no {RUN_MARKER} marker): "
                          f"{', '.join(unmarked)}; --resume marks one, or delete it yourself")
        if not doomed:
            console.print("nothing to delete")
            return
        if not yes and not typer.confirm(f"delete {len(doomed)} run folder(s): {', '.join(doomed)}?"):
            raise typer.Exit(1)
        for path in cleanup_runs(root, doomed):
            console.print(f"deleted {path}")


@app.command("datasets", cls=Command)
def datasets_command() -> None:
    """The built-in tasks, their data, and where else data can come from."""
    from evolm.tasks.catalog import describe_tasks

    table = Table(title="tasks (any task also reads local JSON/JSONL: task.train / task.test = PATH or PATH\\[a:b])")
    rows = describe_tasks()
    for col in ("task", "description", "built-in data"):
        table.add_column(col)
    hub_ids = [row.get("hub_dataset") or "-" for row in rows]
    table.add_column("hub dataset", no_wrap=True, min_width=max(map(len, hub_ids)))  # an id to copy: never cut
    for row, hub_id in zip(rows, hub_ids):
        table.add_row(row["name"], row.get("error") or row["description"], row.get("builtin_data") or "-", hub_id)
    console.print(table)
    console.print("custom tasks: task.name=my_package.my_module:MyTask (a subclass of evolm.tasks.Task)")


if __name__ == "__main__":
    app()
