"""Test reward and KL to the base model per evaluation, for several ES runs (e.g. two sigmas).

    python bench/plot_reward_kl.py OUT.png RUN_DIR[=LABEL] ...

Needs runs made with eval.kl=true; uses the normalised reward where the task reports one.
"""

import sys
from pathlib import Path

from matplotlib.figure import Figure

from evolm.runs import evaluations_by_set, read_jsonl


def main(out: str, runs: list[str]) -> None:
    fig = Figure(figsize=(9, 3.6))
    reward_ax, kl_ax = fig.subplots(1, 2)
    for spec in runs:
        path, _, label = spec.partition("=")
        rows = evaluations_by_set(read_jsonl(Path(path) / "results" / "evaluations.jsonl")).get("test", [])
        key = "normalized_reward" if "normalized_reward" in rows[0] else "reward"
        x = [r["generation"] for r in rows]
        reward_ax.plot(x, [r[key] for r in rows], marker=".", label=label or path)
        kl_ax.plot(x, [r["kl"] for r in rows], marker=".", label=label or path)
        reward_ax.set_ylabel(key.replace("_", " "))
    kl_ax.set_ylabel("KL(θ ‖ base), summed over tokens")
    kl_ax.set_yscale("symlog", linthresh=0.1)
    for ax in (reward_ax, kl_ax):
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
    reward_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
