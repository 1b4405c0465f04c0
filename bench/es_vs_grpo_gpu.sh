#!/usr/bin/env bash
# The ES-against-GRPO head-to-head (issue 20), both optimizers at once on a machine of two GPUs, one each,
# so the pair costs one machine's hold: Qwen2.5-Coder-1.5B-Instruct on countdown through the chat template,
# train countdown.json[:200], curves on the first 200 of the 2,000 test records, 1,024 new tokens, each
# training for SECONDS of its own clock (evaluation excluded), resumed on every call until both are done.
#
#   bench/es_vs_grpo_gpu.sh MODEL DATA RUNS [SECONDS] [CALL_SECONDS]
#     RUNS          folder of the two run folders (es/, grpo/); a run already there is resumed
#     SECONDS       each optimizer's training budget, default 1500 (25 minutes)
#     CALL_SECONDS  wall time of this call (a device call may run 10 minutes), default 540
#
# A run stopped by the call's end (SIGTERM) finishes its generation or step and checkpoints; the next call,
# on this machine or another (RUNS carried back and forth), continues its clock. Afterwards, on any machine:
#   evolm export RUNS/es MODEL_ES       # (GRPO writes RUNS/grpo/model itself)
#   evolm evaluate --adapter MODEL_ES --task countdown --option chat=true --data "DATA[-2000:]" --compare
#   evolm evaluate --adapter MODEL_ES --task countdown --option chat=true --data "DATA[-2000:]" --against RUNS/grpo/model
#   evolm analyze RUNS/es RUNS/grpo --out OUT
# ES: N = 30, σ = 0.001, α = 0.0005 (the paper's), 50 prompts a generation (a 3-minute trial: ~19 s a
# generation, so ~77 generations in 25 minutes). GRPO: TRL's defaults (bench/grpo_gpu.sh).
set -u
model=$1 data=$2 runs=$3 seconds=${4:-1500} call=${5:-540}
mkdir -p "$runs"
if [ -f "$runs/es/config.yaml" ]; then
  es=(python3 -m evolm.cli es --resume "$runs/es" "es.max_seconds=$seconds")
else
  es=(python3 -m evolm.cli es countdown "output_dir=$runs/es" "model.name_or_path=$model" model.dtype=bfloat16
      task.options.chat=true "task.train=$data[:200]" "task.test=$data[-2000:]" task.test_size=200
      decoding.max_new_tokens=1024 es.prompts_per_generation=50 "es.max_seconds=$seconds" eval.every=10
      export=false logging.progress=false)
fi
CUDA_VISIBLE_DEVICES=0 timeout -s TERM "$call" "${es[@]}" >> "$runs/es.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout -s TERM "$call" bash "$(dirname "$0")/grpo_gpu.sh" "$model" "$data" "$runs/grpo" \
  "$seconds" >> "$runs/grpo.log" 2>&1 &
wait
for name in es grpo; do
  echo "== $name"; grep -v Warning "$runs/$name.log" | tail -3
  [ -f "$runs/$name/results/evaluations.jsonl" ] && cut -c1-160 "$runs/$name/results/evaluations.jsonl" | tail -3
done
exit 0
