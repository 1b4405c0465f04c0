#!/usr/bin/env bash
# The ES-against-GRPO head-to-head (issue 20), both optimizers at once on a machine of two GPUs, one each,
# so the pair costs one machine's hold: Qwen2.5-Coder-1.5B-Instruct on the task of head_to_head_tasks.sh
# (TASK=countdown, the default: through the chat template, train countdown.json[:200], curves on the first 200
# of the 2,000 test records, 1,024 new tokens; or TASK=conciseness, DATA its folder), each training for SECONDS
# of its own clock (evaluation excluded), resumed on every call until both are done.
#
#   bench/es_vs_grpo_gpu.sh MODEL DATA RUNS [SECONDS] [CALL_SECONDS] [WHICH]
#     RUNS          folder of the two run folders (es/, grpo/); a run already there is resumed
#     SECONDS       each optimizer's training budget, default 1500 (25 minutes)
#     CALL_SECONDS  wall time of this call (a device call may run 10 minutes), default 540
#     WHICH         the optimizers this call trains, default "es grpo"; the first takes GPU 0, the next GPU 1.
#                   On a machine of one GPU pass one ("es" or "grpo"): the two then take turns, call after
#                   call and session after session, each on its own clock.
#
# At the call's end SIGTERM stops each run at its last checkpoint (GRPO finishes its step; ES abandons the
# generation in progress, off the clock); the next call continues the clock, on this machine or, for ES and
# LoRA GRPO, another (RUNS carried back and forth; a full-weight GRPO checkpoint is ~18 GB and stays on its
# machine, so its calls and its scoring run back to back on one). Afterwards:
#   evolm export RUNS/es MODEL_ES [--generation G]   # G: ES at GRPO's training seconds (GRPO writes RUNS/grpo/model)
#   evolm evaluate --adapter MODEL_ES --task countdown --option chat=true --data "DATA[-2000:]" --compare
#   evolm evaluate --adapter MODEL_ES --task countdown --option chat=true --data "DATA[-2000:]" --against RUNS/grpo/model
#   evolm analyze RUNS/es RUNS/grpo --out OUT
# ES: N = 30, σ = 0.001 (the paper's), α = 0.002 (four times the paper's: chosen by short runs), 50 prompts a
# generation (~19 s a generation, so ~77 generations in 25 minutes). GRPO: TRL's defaults (bench/grpo_gpu.sh).
set -u
model=$1 data=$2 runs=$3 seconds=${4:-1500} call=${5:-540} which=${6:-es grpo}
mkdir -p "$runs"
if [ -f "$runs/es/config.yaml" ]; then
  es=(python3 -m evolm.cli es --resume "$runs/es" "es.max_seconds=$seconds")
else
  . "$(dirname "$0")/head_to_head_tasks.sh"
  es=(python3 -m evolm.cli es "${shared[@]}" "${es_only[@]}" "output_dir=$runs/es" "model.name_or_path=$model"
      model.dtype=bfloat16 "es.max_seconds=$seconds" export=false logging.progress=false)
fi
grpo=(bash "$(dirname "$0")/grpo_gpu.sh" "$model" "$data" "$runs/grpo" "$seconds")
gpu=0
for name in $which; do
  case $name in
    es) command=("${es[@]}") ;;
    grpo) command=("${grpo[@]}") ;;
    *) echo "unknown optimizer '$name' (es or grpo)" >&2; exit 2 ;;
  esac
  CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM "$call" "${command[@]}" >> "$runs/$name.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for name in $which; do
  echo "== $name"; grep -v Warning "$runs/$name.log" | tail -3
  [ -f "$runs/$name/results/evaluations.jsonl" ] && cut -c1-160 "$runs/$name/results/evaluations.jsonl" | tail -3
done
exit 0
