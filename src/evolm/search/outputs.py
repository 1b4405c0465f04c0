"""Run-folder views of the database: results/history.jsonl, results/summary.json, best_adapter/, and the
best variant's scores on eval.sets (results/eval_sets.json); summary.json also carries the end-of-run test
split scores (results/test.json)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from evolm.evaluation import EvalOptions, evaluate_adapter
from evolm.metrics import fitness_statistics
from evolm.runs import RunDir, atomic_write_text, replace_dir
from evolm.search.config import SearchRunConfig
from evolm.search.evolution import Member, rank
from evolm.search.holdout import TEST_FILE
from evolm.search.store import Store, Variant
from evolm.tasks.splits import EvalSet

SETS_FILE = "eval_sets.json"  # under results/


def best_variant(variants: list[Variant]) -> Variant | None:
    done = {v.id: v for v in variants if v.state == "done"}
    ranked = rank([Member(v.id, v.genes, v.fitness) for v in done.values()])
    return done[ranked[0].id] if ranked else None


def member_record(v: Variant) -> dict[str, Any]:
    return {"id": v.id, "slot": v.slot, "origin": v.origin, "parents": v.parents, "mutated": v.mutated,
            "init_from": v.init_from, "genes": v.genes.to_dict(), "fitness": v.fitness, **v.metrics}


def generation_record(generation: int, variants: list[Variant]) -> dict[str, Any]:
    best = best_variant(variants)
    return {
        "generation": generation,
        "members": [member_record(v) for v in variants],
        **fitness_statistics(np.array([v.fitness for v in variants], dtype=float)),
        "best_id": best.id if best else None,
        "train_s": sum(v.metrics.get("train_s", 0.0) for v in variants),
        "eval_s": sum(v.metrics.get("eval_s", 0.0) for v in variants),
    }


def complete_generations(store: Store) -> list[tuple[int, list[Variant]]]:
    """(generation, its variants) for every generation whose variants are all scored."""
    result = []
    for generation in range(store.latest_generation() + 1):
        variants = store.variants(generation)
        if not all(v.state == "done" for v in variants):
            break
        result.append((generation, variants))
    return result


def link_or_copy(source: str, target: str) -> None:
    """A hard link (the adapter files of a variant are never rewritten in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_history(store: Store, run: RunDir) -> None:
    lines = [json.dumps(generation_record(g, vs), default=float) for g, vs in complete_generations(store)]
    atomic_write_text(run.history_file, "".join(line + "\n" for line in lines))


def export_best(store: Store, run: RunDir, generations: int, stopped_by_max_seconds: bool = False) -> Variant | None:
    """Put the best scored adapter in best_adapter/ (a PEFT folder of hard links to the variant's files,
    so no second copy on disk; a copy where the file system has no hard links) and write
    results/summary.json, which names the variant; `generations` the run will have (fewer than
    evolution.generations where evolution.max_seconds stopped it)."""
    variants = store.variants()
    best = best_variant(variants)
    if best is None:
        return None
    target = run.best_adapter_dir
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with store.transaction():  # the database's write lock keeps workers that finish together from colliding
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.copytree(run.root / best.adapter, temporary, copy_function=link_or_copy)
        replace_dir(temporary, target)
    summary = {
        "status": "finished" if store.finished(generations) else "running or stopped",
        "validation": {"fitness": best.fitness, "accuracy": best.metrics.get("accuracy"),
                       "perplexity": best.metrics.get("perplexity")},
        "generations_completed": len(complete_generations(store)),
        "stopped_by_max_seconds": stopped_by_max_seconds,
        "variants_scored": sum(v.state == "done" for v in variants),
        "best": {**member_record(best), "generation": best.generation, "alpha": best.genes.alpha,
                 "adapter": str(best.adapter), "exported_to": target.name},
    }
    atomic_write_text(run.summary_file, json.dumps(summary | held_out_sections(run, best.id), indent=2,
                                                   default=float) + "\n")
    return best


def held_out_sections(run: RunDir, best_id: int) -> dict[str, Any]:
    """The summary's parts from the end-of-run scoring of this best variant: "base" and "final" (the base
    model's and the best variant's test-split metrics), "test" (with the baseline and the sign tests) and
    "sets" (eval.sets); none before that scoring ran."""
    sections: dict[str, Any] = {}
    test = _report_of(run.results / TEST_FILE, best_id)
    if test is not None:
        metrics = test["metrics"]
        sections.update(base=metrics["base"], final=metrics["best"],
                        test={"examples": test["examples"], **metrics, "comparisons": test["comparisons"],
                              "baseline": test.get("baseline")})
    sets = _report_of(run.results / SETS_FILE, best_id)
    if sets is not None:
        sections["sets"] = {name: {"examples": r["examples"], "base": r["base_metrics"], "best": r["adapter_metrics"],
                                   "comparison": r["comparison"], "sign_test_p": r["sign_test_p"]}
                            for name, r in sets["sets"].items()}
    return sections


def _report_of(path: Path, best_id: int) -> dict | None:
    report = json.loads(path.read_text()) if path.is_file() else None
    return report if report is not None and report.get("variant") == best_id else None


def update_summary(run: RunDir, best_id: int) -> None:
    """Add the held-out sections of this best variant to results/summary.json."""
    summary = json.loads(run.summary_file.read_text())
    atomic_write_text(run.summary_file, json.dumps(summary | held_out_sections(run, best_id), indent=2,
                                                   default=float) + "\n")


def score_best_on_sets(run: RunDir, config: SearchRunConfig, best: Variant, sets: list[EvalSet]) -> dict:
    """Score the best variant's adapter and the base model (one batched generation per set, greedy, as the
    fitness evaluation generates) on eval.sets: the full report in results/eval_sets.json, the metrics in
    summary.json under "sets". Skipped when that variant was already scored on these sets (a resumed run)."""
    report_file = run.results / SETS_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if report.get("variant") != best.id or set(report["sets"]) != {s.name for s in sets}:
        options = EvalOptions(task=config.task.name, model=config.model.name_or_path,
                              max_new_tokens=config.fitness.max_new_tokens, device=config.model.device,
                              dtype=config.model.dtype, task_options=config.task.options or None)
        report = {"variant": best.id, **evaluate_adapter(run.best_adapter_dir, options, compare=True, sets=sets)}
        atomic_write_text(report_file, json.dumps(report, indent=2, default=float) + "\n")
    update_summary(run, best.id)
    return report
