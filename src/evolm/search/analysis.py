"""`evolm analyze RUN_DIR`: figures and a Markdown report from a search run's database.

Works on a finished or a running run (it only reads). The report leads with the test split (base model,
default-LoRA baseline and best variant, with sign tests) once the run has scored it. Figures: family tree,
performance timeline, hyperparameter heatmaps, survival, mutation effectiveness; all in RUN_DIR/analysis/.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from evolm.config import read_source
from evolm.runs import atomic_write_text
from evolm.search.outputs import best_variant
from evolm.search.store import Store, Variant, open_search_run
from evolm.search.holdout import TEST_FILE
from evolm.search.splits import SPLITS_FILE, read_records
from evolm.search.targets import REFRESHED_FILE, TARGETS_FILE, describe, read_targets

EDGE_STYLE = {"survivor": ("0.5", "-"), "mutation": ("tab:blue", "-"), "crossover": ("tab:red", "--")}


def analyze(run_dir: Path) -> Path:
    """Write RUN_DIR/analysis/*.png and RUN_DIR/analysis/report.md; returns the report's path."""
    run = open_search_run(run_dir)
    config = read_source(run.config_file)
    store = Store(run.database)
    try:
        variants = store.variants()
    finally:
        store.close()
    out = run.analysis
    out.mkdir(exist_ok=True)
    scored = [v for v in variants if v.state == "done"]
    figures = {}
    if scored:
        figures = {
            "Family tree": family_tree(variants, out / "family_tree.png"),
            "Performance timeline": timeline(scored, out / "timeline.png"),
            "Hyperparameter heatmap": heatmaps(scored, out / "hyperparameter_heatmap.png"),
            "Survival": survival(variants, out / "survival.png"),
            "Mutation effectiveness": mutation_effect(variants, out / "mutation_effectiveness.png"),
        }
    targets_file = run.root / TARGETS_FILE
    targets = describe(read_targets(targets_file)) if targets_file.is_file() else None
    refreshed = sorted(int(p.stem.rpartition("gen")[2]) for p in run.root.glob(REFRESHED_FILE.format(generation="*")))
    if targets and refreshed:
        targets.append("refreshed from the best variant for generations " + ", ".join(map(str, refreshed)))
    test_file = run.results / TEST_FILE
    test = json.loads(test_file.read_text()) if test_file.is_file() else None
    splits = read_records(run.root) if (run.root / SPLITS_FILE).is_file() else None
    report = out / "report.md"
    atomic_write_text(report, render_report(config, variants, figures, targets, test, splits))
    return report


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


def family_tree(variants: list[Variant], path: Path) -> str:
    """Generations left to right; edges: survivor (grey), mutation (blue), crossover (red, dashed)."""
    where = {v.id: (v.generation, v.slot) for v in variants}
    fig = Figure(figsize=(max(6, 1.2 * (max(x for x, _ in where.values()) + 2)), 5))
    ax = fig.subplots()
    for v in variants:
        colour, style = EDGE_STYLE.get(v.origin, ("0.5", "-"))
        for parent in v.parents:
            (x0, y0), (x1, y1) = where[parent], where[v.id]
            ax.plot([x0, x1], [y0, y1], color=colour, linestyle=style, linewidth=1.2, zorder=1)
    done = [v for v in variants if v.state == "done"]
    points = ax.scatter([v.generation for v in done], [v.slot for v in done], c=[v.fitness for v in done],
                        cmap="viridis", s=260, zorder=2, edgecolors="k")
    waiting = [v for v in variants if v.state != "done"]
    ax.scatter([v.generation for v in waiting], [v.slot for v in waiting], c="white", s=260, zorder=2, edgecolors="0.6")
    for v in variants:
        ax.annotate(str(v.id), where[v.id], ha="center", va="center", fontsize=7, zorder=3)
    best = best_variant(variants)
    if best:
        ax.scatter([best.generation], [best.slot], s=520, facecolors="none", edgecolors="tab:orange", linewidths=2.5,
                   zorder=3)
    fig.colorbar(points, ax=ax, label="fitness")
    for origin, (colour, style) in EDGE_STYLE.items():
        ax.plot([], [], color=colour, linestyle=style, label=origin)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    ax.set(xlabel="generation", ylabel="slot", title="Family tree (orange ring: best)",
           xticks=sorted({v.generation for v in variants}), yticks=sorted({v.slot for v in variants}))
    ax.invert_yaxis()
    return _save(fig, path)


def timeline(scored: list[Variant], path: Path) -> str:
    """Fitness (every variant, mean, best), accuracy and answer perplexity per generation."""
    generations = sorted({v.generation for v in scored})
    by_gen = {g: [v for v in scored if v.generation == g] for g in generations}
    fig = Figure(figsize=(7, 8))
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("fitness", "fitness"), ("accuracy", "accuracy"), ("perplexity", "answer perplexity"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = {g: [_metric(v, key) for v in vs if _metric(v, key) is not None] for g, vs in by_gen.items()}
        xs = [g for g in generations for _ in values[g]]
        ax.scatter(xs, [y for g in generations for y in values[g]], s=18, color="0.6", label="variants")
        present = [g for g in generations if values[g]]
        ax.plot(present, [np.mean(values[g]) for g in present], marker="o", label="mean")
        best = max if key != "perplexity" else min
        # dashed with hollow markers: where best equals mean (e.g. accuracy 0 everywhere) both stay visible
        ax.plot(present, [best(values[g]) for g in present], marker="s", markerfacecolor="none", linestyle="--",
                label="best")
        ax.set_ylabel(label)
        spread = [y for g in present for y in values[g]]
        if key == "perplexity" and spread and min(spread) > 0 and max(spread) / min(spread) > 20:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("generation")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole generations, not crowded
    return _save(fig, path)


def _metric(v: Variant, key: str) -> float | None:
    return v.fitness if key == "fitness" else v.metrics.get(key)


def _label(gene: str, value) -> str:
    return f"{value:.2g}" if gene == "learning_rate" else str(value)


def heatmaps(scored: list[Variant], path: Path) -> str:
    """Mean fitness over variants for pairs of hyperparameters (blank: never tried)."""
    pairs = [("rank", "learning_rate"), ("target_modules", "alpha_multiplier"), ("dropout", "epochs")]
    fig = Figure(figsize=(5 * len(pairs), 4))
    axes = fig.subplots(1, len(pairs))
    for ax, (row_gene, col_gene) in zip(axes, pairs, strict=True):
        cells = defaultdict(list)
        for v in scored:
            genes = v.genes.to_dict()
            cells[(genes[row_gene], _label(col_gene, genes[col_gene]))].append(v.fitness)
        rows = sorted({r for r, _ in cells}, key=str if row_gene == "target_modules" else float)
        cols = sorted({c for _, c in cells}, key=float)
        grid = np.full((len(rows), len(cols)), np.nan)
        for (r, c), values in cells.items():
            grid[rows.index(r), cols.index(c)] = np.mean(values)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.3g}\n(n={len(cells[(rows[i], cols[j])])})", ha="center", va="center",
                        fontsize=7, color="w")
        ax.set_xticks(range(len(cols)), cols, rotation=45)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set(xlabel=col_gene, ylabel=row_gene)
        fig.colorbar(image, ax=ax, label="mean fitness")
    return _save(fig, path)


def lines(variants: list[Variant]) -> dict[int, list[Variant]]:
    """Variants grouped by the configuration line they continue (survivors join their parent's line)."""
    root: dict[int, int] = {}
    grouped: dict[int, list[Variant]] = defaultdict(list)
    for v in sorted(variants, key=lambda v: v.id):
        root[v.id] = root[v.parents[0]] if v.origin == "survivor" else v.id
        grouped[root[v.id]].append(v)
    return grouped


def survival_rates(variants: list[Variant]) -> dict[str, tuple[int, int]]:
    """For each origin, (variants selected to survive, variants that could have been), last generation excluded."""
    survived = {v.parents[0] for v in variants if v.origin == "survivor"}
    last = max((v.generation for v in variants), default=0)
    rates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for v in variants:
        if v.state == "done" and v.generation < last:
            rates[v.origin][0] += v.id in survived
            rates[v.origin][1] += 1
    return {origin: (a, b) for origin, (a, b) in rates.items()}


def survival(variants: list[Variant], path: Path) -> str:
    """Generations each configuration line lived, and how often each kind of variant was selected."""
    grouped = lines(variants)
    fig = Figure(figsize=(11 + 0.15 * len(grouped), 4))
    left, right = fig.subplots(1, 2, width_ratios=(2, 1))
    roots = sorted(grouped, key=lambda r: (-len(grouped[r]), r))
    best = [max((x.fitness for x in grouped[r] if x.fitness is not None), default=np.nan) for r in roots]
    left.bar(range(len(roots)), [len(grouped[r]) for r in roots], color=matplotlib.colormaps["viridis"](_unit(best)))
    left.set_xticks(range(len(roots)), [f"{r}\nr{grouped[r][0].genes.rank}" for r in roots], fontsize=7)
    left.set(xlabel="line (first variant id, rank); colour: its best fitness (yellow = best)",
             ylabel="generations alive", title="Survival of configurations")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    rates = survival_rates(variants)
    names = sorted(rates)
    right.bar(names, [rates[n][0] / rates[n][1] for n in names], color="tab:green")
    right.set(ylabel="share selected to survive", title="Selection by origin", ylim=(0, 1))
    for i, n in enumerate(names):
        right.text(i, rates[n][0] / rates[n][1] + 0.02, f"{rates[n][0]}/{rates[n][1]}", ha="center", fontsize=8)
    return _save(fig, path)


def _unit(values: list[float]) -> np.ndarray:
    array = np.nan_to_num(np.array(values, dtype=float), nan=np.nanmin(values) if np.isfinite(values).any() else 0.0)
    span = array.max() - array.min() if array.size else 0.0
    return (array - array.min()) / span if span > 0 else np.full_like(array, 0.5)


def fitness_changes(variants: list[Variant]) -> dict[str, list[float]]:
    """Fitness gained over the first (fitter) parent: by origin, and by each mutated hyperparameter."""
    by_id = {v.id: v for v in variants}
    changes: dict[str, list[float]] = defaultdict(list)
    for v in variants:
        parent = by_id[v.parents[0]] if v.parents else None
        if v.state != "done" or parent is None or parent.fitness is None:
            continue
        delta = v.fitness - parent.fitness
        changes["continued training" if v.origin == "survivor" else v.origin].append(delta)
        for gene in v.mutated:
            changes[f"mutated {gene}"].append(delta)
    return dict(changes)


def mutation_effect(variants: list[Variant], path: Path) -> str:
    changes = fitness_changes(variants)
    fig = Figure(figsize=(max(6, 1.1 * len(changes) + 2), 4))
    ax = fig.subplots()
    names = sorted(changes)
    if names:
        ax.boxplot([changes[n] for n in names], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(changes[n])})" for n in names], fontsize=7, rotation=30)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set(ylabel="fitness - parent's fitness", title="Mutation effectiveness")
    return _save(fig, path)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def test_section(test: dict) -> list[str]:
    """The headline: base model, default LoRA and best variant on the test split, and their sign tests."""
    names = {"base": "base model", "default_lora": "default LoRA", "best": f"best variant ({test['variant']})"}
    metrics = test["metrics"]
    text = ["## Test split", "", f"{test['examples']} rows that took no part in training or selection, scored once "
            "at the end (greedy).", "", _row(["model", "accuracy", "mean reward", "training"]), _row(["---"] * 4)]
    baseline = test.get("baseline")
    training = {"base": "-", "best": "searched",
                "default_lora": baseline and f"r 16, alpha 32, lr 2e-4, q_proj/v_proj, {baseline['lineage_steps']} "
                                             "steps (the best variant's lineage)"}
    text += [_row([names[name], _num(metrics[name].get("accuracy")), _num(metrics[name]["reward"]), training[name]])
             for name in names if name in metrics]
    text += ["", _row(["comparison", "improvements", "regressions", "sign test p"]), _row(["---"] * 4)]
    for key, c in test["comparisons"].items():
        challenger, _, reference = key.partition("_vs_")
        text.append(_row([f"{names[challenger]} vs {names[reference]}", c["improvements"], c["regressions"],
                          _num(c["sign_test_p"], 3)]))
    return text + [""]


def render_report(config: dict, variants: list[Variant], figures: dict[str, str],
                  targets: list[str] | None = None, test: dict | None = None,
                  splits: list[dict] | None = None) -> str:
    """The Markdown report; `targets` describes self-sampled training targets where the run used them, `test`
    is results/test.json once the run has scored its test split, `splits` the rows of each split."""
    scored = [v for v in variants if v.state == "done"]
    evolution = config.get("evolution", {})
    total = evolution.get("population", 0) * evolution.get("generations", 0)
    budget = evolution.get("max_seconds")
    planned = f"{total}" + (f" (fewer once evolution.max_seconds, {budget:g} s of the variants' training and "
                            "scoring, is spent: the generation in progress is then the last)" if budget else "")
    text = [f"# evolm search report: {config['task']['name']} on {config['model']['name_or_path']}", "",
            f"{len(scored)} of {planned} variants scored; fitness = {config['fitness']['accuracy_weight']} x accuracy "
            f"- {config['fitness']['perplexity_weight']} x answer perplexity, on the validation split.", ""]
    if splits:
        text += ["Splits (`splits.jsonl`): " + ", ".join(f"{r['split']} {len(r['rows'])} rows" for r in splits)
                 + ".", ""]
    if test:
        text += test_section(test)
    if targets:
        text += ["Training targets: the base model's own correct answers (`training.targets=self`): "
                 + "; ".join(targets) + ".", ""]
    best = best_variant(variants)
    if best is None:
        return "\n".join(text + ["No variant has been scored yet."]) + "\n"
    genes = best.genes.to_dict()
    text += ["## Best variant (validation split)", "",
             _row(["id", "generation", *genes, "alpha", "fitness", "accuracy", "perplexity"]),
             _row(["---"] * (len(genes) + 6)),
             _row([best.id, best.generation, *[_label(k, x) for k, x in genes.items()], best.genes.alpha,
                   _num(best.fitness), _num(best.metrics.get("accuracy")), _num(best.metrics.get("perplexity"))]),
             "", f"Adapter: `{best.adapter}` (exported to `best_adapter/` when the run ends).", "",
             "## Generations", "", _row(["generation", "scored", "best fitness", "mean fitness", "best accuracy",
                                         "lowest perplexity", "train s", "eval s"]), _row(["---"] * 8)]
    for g in sorted({v.generation for v in scored}):
        vs = [v for v in scored if v.generation == g]
        accuracies = [v.metrics["accuracy"] for v in vs if v.metrics.get("accuracy") is not None]
        text.append(_row([g, len(vs), _num(max(v.fitness for v in vs)), _num(np.mean([v.fitness for v in vs])),
                          _num(max(accuracies)) if accuracies else "n/a",
                          _num(min(v.metrics["perplexity"] for v in vs)),
                          f"{sum(v.metrics['train_s'] for v in vs):.0f}",
                          f"{sum(v.metrics['eval_s'] for v in vs):.0f}"]))
    text += ["", "## Mutation effectiveness", "", "Fitness of a variant minus that of its first (fitter) parent.", "",
             _row(["change", "n", "mean", "improved"]), _row(["---"] * 4)]
    for name, deltas in sorted(fitness_changes(variants).items()):
        improved = f"{sum(d > 0 for d in deltas)}/{len(deltas)}"
        text.append(_row([name, len(deltas), _num(float(np.mean(deltas))), improved]))
    text += ["", "## Survival", "", _row(["origin", "selected to survive"]), _row(["---"] * 2)]
    text += [_row([origin, f"{a}/{b}"]) for origin, (a, b) in sorted(survival_rates(variants).items())]
    text += ["", "## All scored variants (best first)", "",
             _row(["id", "gen", "origin", "parents", *genes, "fitness", "accuracy", "perplexity", "loss"]),
             _row(["---"] * (len(genes) + 8))]
    for v in sorted(scored, key=lambda v: -v.fitness):
        text.append(_row([v.id, v.generation, v.origin + (f" ({', '.join(v.mutated)})" if v.mutated else ""),
                          ",".join(map(str, v.parents)) or "-", *[_label(k, x) for k, x in v.genes.to_dict().items()],
                          _num(v.fitness), _num(v.metrics.get("accuracy")), _num(v.metrics.get("perplexity")),
                          _num(v.metrics.get("train_loss"))]))
    text += [""] + [f"## {title}\n\n![{title}]({name})\n" for title, name in figures.items()]
    return "\n".join(text) + "\n"
