#!/usr/bin/env bash
# `evolm search` on one H200 with a held-out test split and a default-LoRA baseline (issue 22):
# Qwen2.5-Coder-1.5B-Instruct on the ES paper's GSM8K file (8,792 rows), training.targets=self with the
# targets resampled from the best variant every generation, 4 variants x 3 generations. The file's rows
# are shuffled (seed 0) into 1,500 training, 300 validation (fitness, selection) and 500 test rows,
# recorded in RUN_DIR/splits.jsonl; the 500 test rows take no part in training or selection and are
# scored once, at the end, for the base model, the best variant and the baseline together
# (RUN_DIR/results/test.json, summary.json and the report's "Test split" table, with sign tests).
#
# The lead's command (on the GPU machine, from the repository root):
#   python ../shared/gpu/stage_model.py qwen2.5-coder-1.5b-instruct   # once: the model at /tmp/models/...
#   bench/search_gsm8k_gpu.sh ../shared/data/es-paper/gsm8k_train.jsonl /tmp/runs/search-holdout-1.5b "$OUT"
# GPU time: about 25 min on one H200. From docs/results.md: the same search on the 0.5B model took
# 345-386 s (12 variants, train ~20 s and evaluate ~5 s each, 33 s to sample 4 answers to 1,500
# questions); the 1.5B model costs about 3x per token, so ~15 min of variants, ~5 min for the three
# rounds of sampling (the base model's, and two refreshes), ~2 min for the baseline and the test
# split, plus model loading. A command cut off by a time limit loses nothing: run the same line again
# on the same machine and it resumes from RUN_DIR (it must still exist there).
#
# usage: bench/search_gsm8k_gpu.sh DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]
#   DATA_JSONL  gsm8k rows {question|problem, answer}, e.g. the ES paper's gsm8k_train.jsonl
#   RUN_DIR     the run folder (keep it on the machine's disk: adapters are large)
#   COPY_TO     optional flat folder (e.g. $OUT) that receives the report, summary, test scores,
#               baseline record, splits, self-sampled targets, history, log and two figures
#   key=value   extra overrides for a fresh run, e.g. evolution.generations=2 or
#               training.refresh_targets_every=null (the base model's targets only)
# MODEL=PATH (optional): another model folder (default /tmp/models/qwen2.5-coder-1.5b-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]}
RUN=${2:?usage: $0 DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]}
COPY_TO=${3:-}
shift $(( $# < 3 ? $# : 3 ))
MODEL=${MODEL:-/tmp/models/qwen2.5-coder-1.5b-instruct}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# the `evolm search` / `evolm analyze` commands, called without depending on the main CLI's wiring
search() { python3 -m evolm.cli search "$@"; }
analyze() { python3 -m evolm.cli analyze "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
if [[ -f "$RUN/run.db" ]]; then
  search --resume "$RUN"
else
  search gsm8k \
    model.name_or_path="$MODEL" model.dtype=bfloat16 \
    task.train="$DATA" task.train_size=1500 splits.validation_size=300 task.test_size=500 \
    output_dir="$RUN" seed=0 baseline=default-lora \
    training.targets=self training.self_samples=4 training.refresh_targets_every=1 \
    evolution.population=4 evolution.generations=3 evolution.keep_top=2 \
    'space.ranks=[8, 16, 32, 64]' \
    training.batch_size=16 training.gradient_accumulation=1 training.max_length=768 \
    fitness.max_new_tokens=256 fitness.batch_size=1200 \
    "$@"
fi
echo "search wall time: $(( $(date +%s) - start )) s"
analyze "$RUN"

if [[ -n "$COPY_TO" ]]; then
  mkdir -p "$COPY_TO"
  cp "$RUN/analysis/report.md" "$RUN/results/summary.json" "$RUN/results/test.json" "$RUN/results/history.jsonl" \
     "$RUN/splits.jsonl" "$RUN/logs/search.log" "$RUN/analysis/timeline.png" "$RUN/analysis/family_tree.png" \
     "$COPY_TO/"
  [[ -f "$RUN/results/baseline.json" ]] && cp "$RUN/results/baseline.json" "$COPY_TO/"
  cp "$RUN"/self_targets*.jsonl "$COPY_TO/" 2>/dev/null || true
fi
