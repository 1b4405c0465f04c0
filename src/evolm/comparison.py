"""Several runs (ES and GRPO alike) on one clock: the test metric against training seconds and against sampled
completions, a table of where each run ended and where each stood at equal training time, and per-example
sign tests from the completions the runs kept (`evolm analyze RUN RUN … --out DIR`); and two scored result
files, reports or run folders' completions, paired per example without any model (`evolm compare A B`)."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from evolm.config import TEST_SET
from evolm.metrics import best_of, compare_scores, headline_metric_name, sign_test
from evolm.reports import DPI, step_key
from evolm.runs import RunDir, RunDirError, atomic_write_text, evaluations_by_set, read_jsonl, read_summary
from evolm.tasks import Score
from evolm.tasks.base import split_slice

CLOCKS = {"time": ("seconds", "training seconds (evaluation excluded)"),
          "completions": ("completions", "sampled completions")}
# what a metric cost in distance from the base (the ES paper's reward-against-KL view), where eval.kl measured it
KL_AXIS = {"kl": ("kl", "KL to the base on the test prompts (a completion)")}


@dataclass
class RunCurve:
    """One run's test evaluations, each with the clock as it stood."""

    label: str
    optimizer: str  # with the run's status where it did not finish ("grpo, diverged"), so no table hides it
    metric: str  # accuracy where the task gives verdicts, else reward
    rows: list[dict]
    root: Path
    config: dict


def read_curve(run_dir: Path) -> RunCurve:
    run = RunDir.open(run_dir)
    config = yaml.safe_load(run.config_file.read_text()) or {}
    rows = [r for r in evaluations_by_set(read_jsonl(run.evaluations_file)).get(TEST_SET, []) if "seconds" in r]
    if not rows:
        raise RunDirError(f"{run_dir} has no test evaluation with a training clock (seconds, completions); runs made "
                          "before evolm recorded one cannot be compared on it")
    metric = headline_metric_name(rows)
    optimizer = "grpo" if "grpo" in config else "es"
    status = read_summary(run).get("status")
    return RunCurve(label=Path(run_dir).name, optimizer=optimizer if status in (None, "finished") else
                    f"{optimizer}, {status}", metric=metric, rows=rows, root=Path(run_dir), config=config)


def comparison_figure(curves: list[RunCurve], axis: str) -> Figure:
    """The test metric of each run (a line per run, its evaluations in order) against one clock, 'time' or
    'completions', or against 'kl', the KL to the base (only the evaluations that measured it: a run without
    any has no line, keeping its colour)."""
    field, label = {**CLOCKS, **KL_AXIS}[axis]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for k, curve in enumerate(curves):
        rows = [r for r in curve.rows if field in r]
        if rows:
            ax.plot([r[field] for r in rows], [r[curve.metric] for r in rows], marker="o", markersize=3,
                    color=f"C{k}", label=f"{curve.label} ({curve.optimizer})")
    metrics = sorted({c.metric for c in curves})
    if axis in KL_AXIS:
        ax.set_xscale("symlog", linthresh=0.1)  # from 0 at the base to tens of nats
    ax.set_xlabel(label)
    ax.set_ylabel(f"test {' / '.join(metrics)}")
    ax.set_title(f"Test {' / '.join(metrics)} against {label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


KL_HEADER = "KL to the base (a completion; a token)"


def _kl_cell(row: dict) -> str:
    """The test prompts' KL to the base at that evaluation (eval.kl), or a dash where the run did not measure it:
    what a metric cost in distance from the base model, the paper's reward-against-KL view."""
    return f"{row['kl']:.3g}; {row['kl_per_token']:.3g}" if "kl" in row and "kl_per_token" in row else "—"


def _clock_row(curve: RunCurve, row: dict) -> str:
    """A run's evaluation as a row of the clock tables: run, optimizer, metric, seconds, completions, step, KL."""
    return (f"| {curve.label} | {curve.optimizer} | {curve.metric} {row[curve.metric]:.4g} | {row['seconds']:.1f} | "
            f"{row['completions']} | {row[step_key([row])]} | {_kl_cell(row)} |")


def comparison_table(curves: list[RunCurve]) -> str:
    lines = [f"| run | optimizer | final test metric | seconds | completions | last step | {KL_HEADER} |",
             "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_clock_row(curve, curve.rows[-1]) for curve in curves]) + "\n"


def equal_time_table(curves: list[RunCurve]) -> str:
    """Each run at the clock the shortest one stopped at: its last evaluation at or before those seconds, so
    no run is credited with training time another did not get."""
    shared = min(curve.rows[-1]["seconds"] for curve in curves)
    lines = [f"At equal training time: each run's last test evaluation at or before {shared:.1f} s, the "
             "shortest run's clock.", "",
             f"| run | optimizer | test metric | seconds | completions | step | {KL_HEADER} |",
             "|---|---|---|---|---|---|---|"]
    at = []
    for curve in curves:
        row = [r for r in curve.rows if r["seconds"] <= shared][-1]
        at.append(row[step_key([row])])
        lines.append(_clock_row(curve, row))
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(curves), 2):
        first, second = kept_scores(a, TEST_SET, at[i]), kept_scores(b, TEST_SET, at[j])
        if first is None or second is None or len(first) != len(second):
            continue
        if set_records(a.config, TEST_SET) != set_records(b.config, TEST_SET):
            pairs.append(f"| {b.label} against {a.label} | not the same records | | | | |")
            continue
        pairs.append(f"| {b.label} against {a.label} | {_pair_cells(first, second)} |")
    if pairs:  # where both runs kept those evaluations' completions (eval.keep_completions=every)
        lines += ["", "Per example at equal training time (the test split; better: right where the other was "
                  "wrong, or a higher reward):", "",
                  "| runs | second better | first better | both right | both wrong | sign test p |",
                  "|---|---|---|---|---|---|", *pairs]
    return "\n".join(lines) + "\n"


def kept_scores(curve: RunCurve, name: str, step: int) -> list[Score] | None:
    """The per-example outcomes of one evaluation of a set, where the run folder kept its completions."""
    prefix = "completions" if name == TEST_SET else f"completions_{name}"
    path = curve.root / "results" / f"{prefix}_gen{step:05d}.jsonl"
    rows = read_jsonl(path) or read_jsonl(path.with_name(path.name + ".gz"))
    return [Score(r["reward"], r["correct"]) for r in rows] if rows else None


COMPLETIONS_FILE = re.compile(r"completions_(?:(?P<set>.+)_)?gen(?P<step>\d+)\.jsonl(?:\.gz)?")  # gzipped or not


@dataclass
class KeptSet:
    """One set's per-example outcomes that a run kept: its base's and its final θ's."""

    step: int  # the final evaluation's generation or step
    base: list[Score]
    final: list[Score]
    definition: dict  # what decides which records these are (set_records)


def kept_sets(curve: RunCurve) -> dict[str, KeptSet]:
    """{set: KeptSet} for each set (the test split, eval.final_sets, …) whose base and final completions the
    run folder holds (results/completions[_SET]_genNNNNN.jsonl, written at the base and the final θ)."""
    steps: dict[str, list[int]] = {}
    for path in (curve.root / "results").glob("completions_*gen*.jsonl*"):
        match = COMPLETIONS_FILE.fullmatch(path.name)
        if match:
            steps.setdefault(match["set"] or TEST_SET, []).append(int(match["step"]))
    kept = {}
    for name, found in sorted(steps.items(), key=lambda item: (item[0] != TEST_SET, item[0])):  # test first
        final = max(found)
        if 0 not in found or final == 0:
            continue
        base, last = kept_scores(curve, name, 0), kept_scores(curve, name, final)
        if base is None or last is None or len(base) != len(last):
            continue
        kept[name] = KeptSet(final, base, last, definition=set_records(curve.config, name))
    return kept


def _source_name(source: str | None) -> str | None:
    """A source without its folder (the same file lives in different folders on different machines)."""
    if source is None:
        return None
    location, part = split_slice(source)
    return Path(location.rstrip("/")).name + ("" if part == slice(None) else source[len(location):])


def set_records(config: dict, name: str) -> dict:
    """What decides which records a run's set holds, from its config: the task and its options, the source's
    file name and slice (not its folder: the same file lives in different folders on different machines), and
    the cut (task.test_size for the test split, or the set's size)."""
    task = config.get("task") or {}
    if name == TEST_SET:
        return {"task": task.get("name"), "options": task.get("options"), "source": _source_name(task.get("test")),
                "size": task.get("test_size")}
    spec = ((config.get("eval") or {}).get("sets") or {}).get(name)
    spec = {"source": spec} if isinstance(spec, str) else spec or {}
    return {"task": spec.get("task") or task.get("name"),
            "options": spec.get("options") if spec.get("task") or spec.get("options") else task.get("options"),
            "source": _source_name(spec.get("source")), "size": spec.get("size")}


def _score_of(scores: list[Score]) -> str:
    if all(s.correct is not None for s in scores):
        return f"accuracy {sum(s.correct for s in scores) / len(scores):.4g}"
    return f"reward {sum(s.reward for s in scores) / len(scores):.4g}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _pair_cells(first: list[Score], second: list[Score]) -> str:
    """Table cells of the second against the first per example: second better, first better, both right,
    both wrong, sign test p."""
    c = compare_scores(first, second)
    return f"{c['improvements']} | {c['regressions']} | {c['both_right']} | {c['both_wrong']} | {_p(sign_test(c))}"


def per_example_table(curves: list[RunCurve]) -> str:
    """Each run's final θ against its base, and each pair of runs' final θs against each other, per example
    with the sign test, on every set the runs kept completions of for the same records (same task or set
    definition, same indices)."""
    kept = [kept_sets(curve) for curve in curves]
    lines = ["Per example, at each run's final evaluation (the sets whose base and final completions the runs "
             "kept: the test split's, and eval.final_sets'). Each run's final clock is in the first table: "
             "equal training time only where the runs' budgets were equal.", ""]
    rows = [f"| {name} | {curve.label} | {sets[name].step} | {_score_of(sets[name].base)} → "
            f"{_score_of(sets[name].final)} | {c['improvements']} / {c['regressions']} | {_p(sign_test(c))} |"
            for curve, sets in zip(curves, kept) for name in sets
            for c in [compare_scores(sets[name].base, sets[name].final)]]
    if not rows:
        return "\n".join(lines + ["No run kept both its base's and a final θ's completions of a set "
                                   "(a run keeps them when it finishes)."]) + "\n"
    lines += ["| set | run | final step | base → final | improved / regressed | sign test p |",
              "|---|---|---|---|---|---|", *rows, ""]
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(curves), 2):
        for name in [n for n in kept[i] if n in kept[j]]:
            first, second = kept[i][name], kept[j][name]
            if first.definition != second.definition or len(first.final) != len(second.final):
                pairs.append(f"| {name} | {b.label} against {a.label} | not the same records | | | | |")
                continue
            pairs.append(f"| {name} | {b.label} against {a.label} | {_pair_cells(first.final, second.final)} |")
    if pairs:
        lines += ["Better: right where the other was wrong (tasks with verdicts), else a higher reward.", "",
                  "| set | runs | second better | first better | both right | both wrong | sign test p |",
                  "|---|---|---|---|---|---|---|", *pairs]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """DIR/compare_time.png, DIR/compare_completions.png, DIR/compare_kl.png (where a run measured KL) and
    DIR/compare.md for the runs."""
    curves = [read_curve(Path(r)) for r in run_dirs]
    labels = [c.label for c in curves]
    if len(set(labels)) < len(labels):  # folders of one name from different places: their paths tell them apart
        for curve, run_dir in zip(curves, run_dirs):
            curve.label = str(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    measured_kl = any("kl" in r for c in curves for r in c.rows)
    for axis in [*CLOCKS, *(KL_AXIS if measured_kl else [])]:
        path = out / f"compare_{axis}.png"
        comparison_figure(curves, axis).savefig(path, dpi=DPI)
        written.append(path)
    table = out / "compare.md"
    atomic_write_text(table, "# Runs on one clock\n\n" + comparison_table(curves) + "\n"
                      + equal_time_table(curves) + "\n" + per_example_table(curves))
    return written + [table]


@dataclass
class Outcomes:
    """One model's scored answers per example, as an evaluation report or a run folder recorded them."""

    label: str
    scores: dict[int, Score]  # example index -> the best of its samples
    source: str | None  # the data it answered, where recorded


def _best_per_index(rows: list[tuple[int, float, bool | None]]) -> dict[int, Score]:
    """{example index: the best of its samples} of rows laid out as reports and run folders write them:
    every example once, then again for each further sample."""
    n = len({index for index, _, _ in rows})
    return dict(zip((index for index, _, _ in rows[:n]),
                    best_of([Score(reward, correct) for _, reward, correct in rows], n)))


def read_outcomes(path: Path, set_name: str | None = None) -> Outcomes:
    """Per-example outcomes of an `evolm evaluate --output` report (.json, or .json.gz; the scored model's,
    of `set_name` where it has several sets) or of a run folder's completions file
    (RUN/results/completions[_SET]_genG.jsonl[.gz], which the run's config says the source of)."""
    path = Path(path)
    match = COMPLETIONS_FILE.fullmatch(path.name)
    if match:
        run_root = path.parent.parent
        config = yaml.safe_load(RunDir.open(run_root).config_file.read_text()) or {}
        name = match["set"] or TEST_SET
        source = set_records(config, name)["source"]
        rows = read_jsonl(path)
        if not rows:
            raise ValueError(f"{path}: no completions")
        return Outcomes(f"{run_root.name} {name} at {int(match['step'])}",
                        _best_per_index([(r["index"], r["reward"], r["correct"]) for r in rows]), source)
    try:
        with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as file:
            report = json.load(file)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not an evaluation report (evolm evaluate --output) nor a run folder's "
                         f"completions file: {exc}") from None
    sets = report.get("sets") or {}
    if set_name is None and len(sets) != 1:
        raise ValueError(f"{path} has the sets {', '.join(sets)}: pick one with --set")
    name = set_name or next(iter(sets))
    if name not in sets:
        raise ValueError(f"{path} has no set {name!r} (it has {', '.join(sets)})")
    detail = sets[name].get("examples_detail")
    if not detail:
        raise ValueError(f"{path}: set {name!r} has no per-example results (a report of evolm before 2026-12-01 "
                         "keeps them only with --compare or --against)")
    label = Path(report.get("adapter") or report.get("model") or path.name).name
    return Outcomes(label, _best_per_index([(d["index"], d["adapter_reward"], d["adapter_correct"]) for d in detail]),
                    sets[name].get("source"))


def compare_outcomes(first: Outcomes, second: Outcomes) -> dict:
    """The two paired on the examples both answered: each one's metric there, and the second against the
    first per example (improvements: the second right, or better, where the first was not) with the sign test.
    Outcomes of different recorded sources are not the same records: a ValueError."""
    a, b = _source_name(first.source), _source_name(second.source)
    if a is not None and b is not None and a != b:
        raise ValueError(f"{first.label} answered {first.source}, {second.label} {second.source}: not the same "
                         "records")
    shared = sorted(first.scores.keys() & second.scores.keys())
    if not shared:
        raise ValueError(f"{first.label} and {second.label} share no example index")
    pairs = [(first.scores[i], second.scores[i]) for i in shared]
    counts = compare_scores([x for x, _ in pairs], [y for _, y in pairs])
    return {"examples": len(shared), "sources_recorded": a is not None and b is not None,
            "first": {"label": first.label, "examples": len(first.scores), "metric": _score_of([x for x, _ in pairs])},
            "second": {"label": second.label, "examples": len(second.scores),
                       "metric": _score_of([y for _, y in pairs])},
            "comparison": counts, "sign_test_p": sign_test(counts)}
