#!/usr/bin/env bash
# Base-model accuracy on the math evaluation sets (issue 12's first GPU numbers): one `evolm evaluate`
# scores every set with one model load, greedy, up to 1024 new tokens, the `math` task's prompt and grader.
#
# usage: bench/math_base_gpu.sh MODEL DATA_DIR [extra evolm evaluate options ...]
#   MODEL     a staged model folder (or hub id where the machine is online)
#   DATA_DIR  a folder of JSONL files, each one set named after its file (aime, amc, math500, minerva,
#             olympiad_bench, gsm8k_heldout: what bench/suite_to_jsonl.py writes to .stage/data/suite)
#   extra     e.g. --limit 50 for a quick look, --dtype bfloat16
# Writes $OUT/math_base_<model>.json (per-set metrics: accuracy, mean generated tokens, seconds; every completion), $OUT/math_base_<model>.txt
# (the table and the wall time). OUT defaults to ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: $0 MODEL DATA_DIR [evolm evaluate options ...]}
DATA_DIR=${2:?usage: $0 MODEL DATA_DIR [evolm evaluate options ...]}
shift 2
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import math_verify" 2>/dev/null || { echo "the math task needs math-verify: pip install 'evolm[math]'"; exit 2; }

data=()
for file in "$DATA_DIR"/*.jsonl; do
  data+=(--data "$(basename "$file" .jsonl)=$file")
done
[[ ${#data[@]} -gt 0 ]] || { echo "no .jsonl files in $DATA_DIR"; exit 2; }
name=$(basename "${MODEL%/}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
python3 -m evolm.cli evaluate --model "$MODEL" --task math "${data[@]}" \
  --temperature 0 --max-new-tokens 1024 --output "$OUT/math_base_$name.json" "$@" | tee "$OUT/math_base_$name.txt"
echo "wall time: $(( $(date +%s) - start )) s for $(( ${#data[@]} / 2 )) sets" | tee -a "$OUT/math_base_$name.txt"
