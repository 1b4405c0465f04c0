#!/usr/bin/env bash
# ES on GSM8K with a forgetting check (issue 21): Qwen2.5-Coder-1.5B-Instruct on `gsm8k-boxed` (the math tasks
# always prompt through the chat template: the problem and "Please reason step by step, and put your final
# answer within \boxed{}" as the user turn; graded by math-verify), full-lowrank rank 8, N = 30, σ = 0.001,
# α = 0.002 (four times the paper's: on the chat countdown's 300-s short runs it reached in 188 s what the paper's
# α reached in 800 s, docs/results.md), 1,024 new tokens, training for SECONDS of its own clock (evaluation excluded), then scored on the
# full sets against the base.
#
#   bench/es_gsm8k_gpu.sh MODEL DATA_DIR SUITE_DIR RUN [SECONDS] [CALL_SECONDS] [key=value …]
#     MODEL         the model folder (no hub on the device machine)
#     DATA_DIR      holds the ES paper's gsm8k_train.jsonl (8,792 rows {problem, answer}) and countdown.json
#     SUITE_DIR     what bench/suite_to_jsonl.py wrote: gsm8k_heldout.jsonl (the last 500 rows of
#                   gsm8k_train.jsonl: checked below) and math500.jsonl
#     RUN           the run folder; when it holds a run, that run is resumed (here or on another machine)
#     SECONDS       training budget, default 1500 (25 minutes)
#     CALL_SECONDS  wall time of this call (a device call may run 10 minutes), default 540; a stop inside an
#                   evaluation waits for it (up to a minute), so leave that much of the device call free
#     key=value     `evolm es` overrides (a resume refuses those that would change what the checkpoint means)
#
# Call it again with the same arguments until it prints "all done". While the budget is not spent a call trains
# (stopped at the call's end, a run finishes the generation or evaluation in progress and checkpoints; the next
# call, on any machine, continues its clock). Once it is spent, calls score the last θ and the best θ, one step
# at a time (a call that ends mid-way loses only the step in progress), into
#   RUN/final/{last,best}-{gsm8k,math,countdown}.json: `evolm evaluate --compare --kl` reports (every completion
#   of the model and of the base, per-example improvements, regressions and sign test, KL to the base along the
#   model's own completions) and their logs (.log). The commands, MODEL_DIR being `evolm export RUN
#   MODEL_DIR [--best]` (θ replayed from the fitness log; written under $TMPDIR, rebuilt where missing):
#     evolm evaluate --adapter MODEL_DIR --task gsm8k-boxed --data gsm8k_heldout=SUITE_DIR/gsm8k_heldout.jsonl \
#       --data "gsm8k_val=DATA_DIR/gsm8k_train.jsonl[-700:-500]" --compare --kl --dtype bfloat16 --max-new-tokens 1024
#     evolm evaluate --adapter MODEL_DIR --task math --data math500=SUITE_DIR/math500.jsonl …(the same options)
#     evolm evaluate --adapter MODEL_DIR --task countdown --option chat=true \
#       --data "countdown=DATA_DIR/countdown.json[-2000:]" …(the same options)
# Every call ends with `evolm analyze RUN`: each set at the base → last → best θ (in-training slices), and the
# figures (evolution.png: fitness and a curve per set; update_norm.png: the norm of each generation's update).
#
# Rows of gsm8k_train.jsonl, disjoint: [:-700] train (8,092; 50 a generation in file order, so no row is seen
# twice within 161 generations), [-700:-500] validation (200 rows, `gsm8k_val`: eval.keep_best selects on it),
# [-500:] test (= SUITE_DIR/gsm8k_heldout.jsonl; never selected on).
# Scored every 10 generations, greedy (off the clock, on the machine's hold), each a slice of its full set:
#   test        the first 200 of the 500 held-out GSM8K rows (gsm8k-boxed)
#   gsm8k_val   all 200 validation rows (gsm8k-boxed); the best θ on it is kept (results/best.json)
#   math500     its first 200 problems (math: the same prompt and grader)
#   countdown   the first 200 of the paper's 2,000 test records countdown.json[-2000:], off-task (countdown through
#               the chat template as in the ES-against-GRPO runs: answer reward, stop at </answer>)
# Why 50 prompts a generation: 50 × 30 members = 1,500 completions, one wave of the engine (it holds ~3,200 rows
# at once on an H200): ~19 s a generation for chat countdown's ~780-token completions, less for GSM8K's shorter
# ones, so ~80-150 generations in 25 minutes; fewer prompts make each member's fitness (a mean of 0/1 rewards
# around the base's ~63 %) too noisy to rank 30 members, more buy fewer generations.
set -u
model=$1 data=${2%/} suite=${3%/} run=${4%/} seconds=${5:-1500} call=${6:-540}
shift $(( $# < 6 ? $# : 6 ))
end=$(( $(date +%s) + call ))
for file in "$data/gsm8k_train.jsonl" "$data/countdown.json" "$suite/gsm8k_heldout.jsonl" "$suite/math500.jsonl"; do
  [ -f "$file" ] || { echo "missing $file" >&2; exit 2; }
done
python3 - "$data/gsm8k_train.jsonl" "$suite/gsm8k_heldout.jsonl" <<'EOF' || exit 2
import json, sys
rows = [[json.loads(line) for line in open(path, encoding="utf-8") if line.strip()] for path in sys.argv[1:]]
if rows[0][-500:] != rows[1]:
    sys.exit(f"{sys.argv[2]} is not the last 500 rows of {sys.argv[1]}: the test rows would not be held out")
EOF

trained() {  # the run finished with its budget spent (or all its generations done), as summary.json says
  python3 - "$run/results/summary.json" "$seconds" <<'EOF'
import json, sys
try:
    summary = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(1)
spent = summary.get("training_seconds", 0) >= float(sys.argv[2]) or not summary.get("stopped_by_max_seconds")
sys.exit(0 if summary.get("status") == "finished" and spent else 1)
EOF
}

train() {
  local es config
  if [ -f "$run/config.yaml" ]; then
    es=(python3 -m evolm.cli es --resume "$run" "es.max_seconds=$seconds" "$@")
  else
    config=$(mktemp --suffix .yaml)  # read once: the run keeps its own copy, RUN/config.yaml
    cat > "$config" <<EOF
output_dir: "$run"
model: {name_or_path: "$model", dtype: bfloat16}
task: {name: gsm8k-boxed, train: "$data/gsm8k_train.jsonl[:-700]", test: "$suite/gsm8k_heldout.jsonl", test_size: 200}
space: {kind: full-lowrank, rank: 8}
es: {population: 30, sigma: 0.001, learning_rate: 0.002, prompts_per_generation: 50, max_seconds: $seconds}
decoding: {max_new_tokens: 1024}
eval:
  every: 10
  keep_best: gsm8k_val
  sets:
    gsm8k_val: {source: "$data/gsm8k_train.jsonl[-700:-500]"}
    math500: {source: "$suite/math500.jsonl", task: math, size: 200}
    countdown: {source: "$data/countdown.json[-2000:]", task: countdown, options: {chat: true}, size: 200}
export: false
logging: {progress: false}
EOF
    es=(python3 -m evolm.cli es "$config" "$@")
  fi
  mkdir -p "$(dirname "$run")"
  timeout -s TERM "$call" "${es[@]}" >> "$run.log" 2>&1
  echo "evolm es exit $? (124: stopped at the call's end; call again)"
  [ -z "${config:-}" ] || rm -f "$config"
  grep -v Warning "$run.log" | tail -4
  [ -f "$run/results/evaluations.jsonl" ] && cut -c1-160 "$run/results/evaluations.jsonl" | tail -4
}

left() {  # seconds left of this call, less a minute for the analysis and the way back; fails below a minute
  local seconds=$(( end - $(date +%s) - 60 ))
  echo "$seconds"
  (( seconds >= 60 ))
}

score() {  # the last and the best θ on the full sets, against the base; returns 1 when the call's time ran out
  local models=${TMPDIR:-/tmp}/$(basename "$run")-models tokens which set out args limit
  tokens=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["decoding"]["max_new_tokens"])' \
    "$run/config.yaml")
  mkdir -p "$run/final"
  for which in last best; do
    for set in gsm8k math countdown; do
      out=$run/final/$which-$set.json
      [ -f "$out" ] && continue
      if [ ! -d "$models/$which" ]; then
        limit=$(left) || return 1
        timeout -s TERM "$limit" python3 -m evolm.cli export "$run" "$models/$which" \
          $([ $which = best ] && echo --best) >> "$run/final/export.log" 2>&1 || { tail -3 "$run/final/export.log"; return 1; }
      fi
      case $set in
        gsm8k) args=(--task gsm8k-boxed --data "gsm8k_heldout=$suite/gsm8k_heldout.jsonl"
                     --data "gsm8k_val=$data/gsm8k_train.jsonl[-700:-500]") ;;
        math) args=(--task math --data "math500=$suite/math500.jsonl") ;;
        countdown) args=(--task countdown --option chat=true --data "countdown=$data/countdown.json[-2000:]") ;;
      esac
      limit=$(left) || return 1
      COLUMNS=160 timeout -s TERM "$limit" python3 -m evolm.cli evaluate --adapter "$models/$which" "${args[@]}" \
        --compare --kl --dtype bfloat16 --max-new-tokens "$tokens" --output "$out.part" > "${out%.json}.log" 2>&1 \
        || { tail -3 "${out%.json}.log"; return 1; }
      mv "$out.part" "$out"
      echo "== $which θ, $set"; grep -E "│|improvements|KL to the base" "${out%.json}.log"
    done
  done
}

trained || train "$@"
if trained; then
  score && echo "all done: $run/final" || echo "scoring continues in the next call ($(ls "$run/final"/*.json 2>/dev/null | wc -l) of 6 reports)"
fi
[ -f "$run/config.yaml" ] && python3 -m evolm.cli analyze "$run"
exit 0
