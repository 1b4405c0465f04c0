"""Convert the ES-at-scale evaluation suite (`datasets` save_to_disk folders) into JSONL files that
`evolm evaluate --task math --data FILE` reads on a machine without the `datasets` package.

    python bench/suite_to_jsonl.py SUITE_DIR OUT_DIR [--gsm8k GSM8K_TRAIN_JSONL] [--heldout 500]

SUITE_DIR is a DatasetDict folder (dataset_dict.json) or a folder of Dataset folders, e.g.
../shared/data/es-paper/es-at-scale/datasets/evaluation_suite/math (aime, amc, math500, minerva,
olympiad_bench; rows {problem, answer[, difficulty]}). Each becomes OUT_DIR/NAME.jsonl with every column
kept as it is (answers stay strings, numbers or lists of accepted strings: the math task reads all three).

--gsm8k also writes OUT_DIR/gsm8k_heldout.jsonl: the last --heldout rows of the ES paper's
gsm8k_train.jsonl (8,792 rows {problem, answer}). Why those rows: the paper's release has no GSM8K test
file, and evolm's runs train on leading rows (the search bench: the first 400; ES presets: a prefix), so
the tail is data no evolm run trained on. Caveat: `bench/search_gsm8k_gpu.sh` holds out the file's last
100 rows to *select* its best variant; compare search results on `gsm8k_train.jsonl[6000:6500]` instead.

Prints one line per file written: name and row count. The output folder is for staging, not for the repo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def suite_splits(suite: Path) -> dict[str, list[dict]]:
    """{split name: rows} of a DatasetDict folder, or of each Dataset folder inside `suite`."""
    import datasets  # the `datasets` extra: pip install 'evolm[datasets]'

    if (suite / "dataset_dict.json").is_file():
        names = json.loads((suite / "dataset_dict.json").read_text())["splits"]
    else:
        names = sorted(p.name for p in suite.iterdir() if (p / "state.json").is_file())
    return {name: [dict(row) for row in datasets.load_from_disk(str(suite / name))] for name in names}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path.name}\t{len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gsm8k", type=Path, help="gsm8k_train.jsonl: also write its last --heldout rows")
    parser.add_argument("--heldout", type=int, default=500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in suite_splits(args.suite).items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
    if args.gsm8k:
        lines = [line for line in args.gsm8k.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_jsonl(args.out / "gsm8k_heldout.jsonl", [json.loads(line) for line in lines[-args.heldout:]])


if __name__ == "__main__":
    main()
