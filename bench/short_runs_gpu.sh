#!/usr/bin/env bash
# Short runs of one optimizer on the head-to-head's task, one per setting, to choose its settings (issue 20: "ES:
# choose σ, N, es.prompts_per_generation by short runs; GRPO: TRL's defaults, then a short sweep of learning rate
# and β"). Each run trains SECONDS of its own clock on the task of head_to_head_tasks.sh (TASK=countdown or
# conciseness) with the head-to-head's settings (less its full-set scoring at the end) plus its own overrides, one
# after another on GPU 0; then `evolm analyze` puts them all on one clock in RUNS/compare/ (compare.md: final and
# at equal training time).
#
#   bench/short_runs_gpu.sh MODEL DATA RUNS SECONDS es|grpo "SETTING" ["SETTING" …]
#     SETTING  space-separated overrides of one run, e.g. "es.learning_rate=0.002" or
#              "grpo.learning_rate=3e-6 grpo.beta=0.04"; "" is the defaults. The run folder is named after them.
#   e.g. bench/short_runs_gpu.sh $M $D /tmp/runs/alpha 300 es "" "es.learning_rate=0.001" "es.learning_rate=0.002"
#
# A run already finished in RUNS is skipped and one that stopped part-way is resumed, so the script may be called
# again (on another machine, with RUNS carried: ES folders are small; a GRPO run's full-weight checkpoint and
# model, ~21 GB, are deleted once it finishes, leaving its history, curve and completions). For device calls
# shorter than the sweep start it in the background (`setsid nohup … &`) and poll.
set -u
model=$1 data=$2 runs=$3 seconds=$4 optimizer=$5
shift 5
case $optimizer in es|grpo) ;; *) echo "optimizer '$optimizer': es or grpo" >&2; exit 2 ;; esac
. "$(dirname "$0")/head_to_head_tasks.sh"
shared+=("eval.sets={}" "eval.final_sets=[]")  # short runs compare on the curve's records; the full set is the head-to-head's
mkdir -p "$runs"
folders=()
for setting in "$@"; do
  read -r -a overrides <<< "$setting"
  name=$(printf '%s' "${setting:-defaults}" | tr ' =' '_-')
  run=$runs/$optimizer-$name
  folders+=("$run")
  if [ -f "$run/results/summary.json" ] && grep -q '"status": "finished"' "$run/results/summary.json"; then
    echo "== $run: finished before"; continue
  fi
  echo "== $run: ${setting:-defaults}"
  if [ -f "$run/config.yaml" ]; then
    python3 -m evolm.cli "$optimizer" --resume "$run" >> "$run.log" 2>&1
  elif [ "$optimizer" = es ]; then
    python3 -m evolm.cli es "${shared[@]}" "${es_only[@]}" "output_dir=$run" "model.name_or_path=$model" \
      model.dtype=bfloat16 "es.max_seconds=$seconds" export=false logging.progress=false "${overrides[@]}" \
      >> "$run.log" 2>&1
  else
    python3 -m evolm.cli grpo "${shared[@]}" "${grpo_only[@]}" "output_dir=$run" "model.name_or_path=$model" \
      model.dtype=bfloat16 grpo.steps=10000 "grpo.max_seconds=$seconds" grpo.group_size=8 grpo.save_every=100000 \
      logging.progress=false "${overrides[@]}" >> "$run.log" 2>&1
  fi
  status=$?
  [ "$optimizer" = grpo ] && [ $status -eq 0 ] && rm -rf "$run/checkpoints"/checkpoint-* "$run/model"
  grep -v Warning "$run.log" | tail -2
done
python3 -m evolm.cli analyze "${folders[@]}" --out "$runs/compare" && cat "$runs/compare/compare.md"
