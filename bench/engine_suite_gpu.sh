#!/usr/bin/env bash
# The engine's benchmark table in one GPU call: the three regimes of docs/benchmarks.md for full-lowrank rank 8
# (fixed length, short answers with a stop, reasoning through the chat template), lora rank 1 and the dense
# full space, each with its no-perturbation row and a reference row (PEFT / W + σE and generate, timed on a few
# prompts and scaled to all). A small smoke run goes first: if the engine fails on this device, nothing else runs.
#   [RUNS='smoke chat …'] [LIMIT=seconds per run] bench/engine_suite_gpu.sh MODEL COUNTDOWN_JSON
# Logs and JSON go to $OUT/engine.tgz (refreshed after every run, so a call cut short keeps what finished).
set -u
cd "$(dirname "$0")/.."
model=$1 data=$2
OUT=${OUT:-out} work=/tmp/engine-suite
mkdir -p "$OUT" "$work"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$work/device.txt"
run() {
  local name=$1; shift
  local start=$SECONDS
  timeout "${LIMIT:-300}" python3 bench/engine_gpu.py --model "$model" --data "$data" --out "$work" "$@" \
    > "$work/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - start)) s"
  grep -v -i "warn" "$work/$name.log" | tail -n 13
  tar czf "$OUT/engine.tgz" -C "$work" .
  return $rc
}
declare -A args=(
  [smoke]="--space full-lowrank --rank 8 --members 4 --prompts 16 --max-new-tokens 32 --reference-prompts 4"
  [chat]="--space full-lowrank --rank 8 --chat --stop </answer> --reference-prompts 16"
  [fixed256]="--space full-lowrank --rank 8 --max-new-tokens 256 --reference-prompts 32"
  [stop]="--space full-lowrank --rank 8 --stop </answer> --reference-prompts 32"
  [lora-fixed256]="--space lora --rank 1 --max-new-tokens 256 --reference-prompts 32"
  [full-stop]="--space full --stop </answer> --reference-prompts 32"
)
for name in ${RUNS:-smoke chat fixed256 stop lora-fixed256 full-stop}; do
  # shellcheck disable=SC2086  # the arguments are words
  run "$name" ${args[$name]} || [ "$name" != smoke ] || exit 1
done
exit 0
