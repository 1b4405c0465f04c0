#!/usr/bin/env bash
# A short real `evolm search` on one H100/H200: Qwen2.5-Coder-0.5B-Instruct on GSM8K, sized for about
# 8 minutes (4 variants x 3 generations, 400 training / 100 held-out evaluation examples), then
# `evolm analyze`. Resumable: run it again with the same RUN_DIR and it continues where it stopped.
#
# usage: bench/search_gsm8k_gpu.sh DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]
#   DATA_JSONL  gsm8k rows {question|problem, answer}, e.g. the ES paper's gsm8k_train.jsonl
#   RUN_DIR     the run folder (keep it on the machine's disk: adapters are large)
#   COPY_TO     optional flat folder (e.g. $OUT) that receives the report, summary, history, log
#               and two figures (8 small files)
#   key=value   extra overrides for a fresh run, e.g. evolution.generations=2, or
#               training.targets=self to learn the base model's own correct answers instead of the
#               file's answer-only targets
# CHECK_DATA=SOURCE (optional): afterwards compare the best adapter with the base model on data the
#               search never saw (`evolm evaluate --compare`), e.g. 'gsm8k_train.jsonl[6000:6500]'
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: $0 DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]}
RUN=${2:?usage: $0 DATA_JSONL RUN_DIR [COPY_TO] [key=value ...]}
COPY_TO=${3:-}
shift $(( $# < 3 ? $# : 3 ))
MODEL=${MODEL:-/tmp/models/qwen2.5-coder-0.5b-instruct}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# the `evolm search` / `evolm analyze` commands, called without depending on the main CLI's wiring
search() { python3 -m evolm.cli search "$@"; }
analyze() { python3 -m evolm.cli analyze "$@"; }
evaluate() { python3 -m evolm.cli evaluate "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
if [[ -f "$RUN/run.db" ]]; then
  search --resume "$RUN"
else
  search gsm8k \
    model.name_or_path="$MODEL" model.dtype=bfloat16 \
    task.train="$DATA" task.train_size=400 task.test_size=100 \
    output_dir="$RUN" seed=0 \
    evolution.population=4 evolution.generations=3 evolution.keep_top=2 \
    'space.ranks=[8, 16, 32, 64]' \
    training.batch_size=16 training.gradient_accumulation=1 training.max_length=768 \
    fitness.max_new_tokens=256 fitness.batch_size=100 \
    "$@"
fi
echo "search wall time: $(( $(date +%s) - start )) s"
analyze "$RUN"

if [[ -n "${CHECK_DATA:-}" ]]; then
  evaluate --adapter "$RUN/best_adapter" --task gsm8k --compare --data "$CHECK_DATA" --max-new-tokens 256 \
    --output "$RUN/analysis/check_compare.json"
fi

if [[ -n "$COPY_TO" ]]; then
  mkdir -p "$COPY_TO"
  cp "$RUN/analysis/report.md" "$RUN/results/summary.json" "$RUN/results/history.jsonl" "$RUN/logs/search.log" \
     "$RUN/analysis/timeline.png" "$RUN/analysis/family_tree.png" "$COPY_TO/"
  [[ -f "$RUN/analysis/check_compare.json" ]] && cp "$RUN/analysis/check_compare.json" "$COPY_TO/"
fi
