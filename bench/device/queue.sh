#!/usr/bin/env bash
# The GPU runs still owed to the open issues, in priority order, for one lent machine: each step resumes or skips
# what is already done under /tmp/runs. Start it with bg.sh (README.md); its results go to docs/ afterwards.
set -u
# the run folders (and logs) under /tmp/runs that the steps below write: poll.sh packs these when TAR is not given
# QUEUE_FOLDERS: overlap chat-row2 fixed-row-levers chat-row-levers fixed-row-fp8 chat-row-fp8 kv-agree conc-beta grpo-h2h-tuned grpo-h2h-tuned.log search-copy search.log gsm8k gsm8k.log
. bench/device/env.sh
R=/tmp/runs
mkdir -p $R
# a hold that ended mid-chain: the last call's $OUT/chain.tgz, copied here as .stage/chain.tgz, continues it
[ -f .stage/chain.tgz ] && [ -z "$(ls -A $R)" ] && tar -C $R -xzf .stage/chain.tgz
engine_row() {  # NAME ARGS…: one bench/engine_gpu.py row into $R/NAME (its log holds the JSON before the reference)
  local name=$1; shift
  [ -f $R/$name/done ] && return
  mkdir -p $R/$name
  timeout 330 python3 bench/engine_gpu.py --model $M --data $D --space full-lowrank --rank 8 --out $R/$name "$@" \
    > $R/$name/log.txt 2>&1
  local status=$?  # done when it ran (or ran out of time in its reference), not when it failed
  { [ $status -eq 0 ] || [ $status -eq 124 ]; } && touch $R/$name/done
  grep -E "^device|^generation|tok|seconds|identical" $R/$name/log.txt | tail -n 20
}
echo "== issue 18: the decode step's levers (decode_step_gpu.py): two streams, the lowrank kernel, the prefix copies"
if [ ! -f $R/overlap/decode-step.json ]; then
  mkdir -p $R/overlap
  timeout 240 python3 bench/decode_step_gpu.py --model $M --shapes 107x700,200x300 --variants '' --profile '' \
    --lone '' --out $R/overlap > $R/overlap/log.txt 2>&1; grep -v Warning $R/overlap/log.txt | tail -n 12
fi
# the levers that paid in the decode-step bench: two streams (the pair ≥ 5 % under its parts in turn), the lowrank
# kernel (the step ≥ 2 % faster with it); LEVERS holds their engine_gpu.py flags ('' when neither paid)
LEVERS=$(python3 -c "import json; r = json.load(open('$R/overlap/decode-step.json'))['shapes'][0]; o = r['overlap']
flags = ['--interleave'] * (o['both on two streams'] < 0.95 * (o['half attention'] + o['half matmuls']))
flags += ['--lowrank-kernel'] * (r['step, lowrank kernel'] < 0.98 * r['step'])
print(' '.join(flags))" 2>/dev/null)
echo "levers that paid: ${LEVERS:-none}"
echo "== issue 18: the exact rows, steady state (second generation), plain and with the levers that paid"
engine_row chat-row2 --chat --stop '</answer>' --generations 2 --skip-plain --reference-prompts 1
if [ -n "$LEVERS" ]; then  # against fixed-row2 (18.4 s, docs/bench/2026-12-04) and chat-row2
  engine_row fixed-row-levers --max-new-tokens 256 --generations 2 --reference-prompts 1 $LEVERS
  engine_row chat-row-levers --chat --stop '</answer>' --generations 2 --skip-plain --reference-prompts 1 $LEVERS
  [ -f $R/fixed-row-levers/done ] || { echo "the levers' row failed: the fp8 rows run without them"; LEVERS=; }
fi
echo "== issue 18: the fp8 KV cache (opt-in, inexact: compare mean_fitness) with the levers that paid"
engine_row fixed-row-fp8 --max-new-tokens 256 --generations 2 --reference-prompts 1 --kv-cache-dtype fp8 $LEVERS
engine_row chat-row-fp8 --chat --stop '</answer>' --generations 2 --skip-plain --reference-prompts 1 \
  --kv-cache-dtype fp8 $LEVERS
if [ ! -f $R/kv-agree/agree.json ]; then  # the base model's 200 chat completions with both caches: accuracy and parting
  mkdir -p $R/kv-agree
  timeout 300 python3 bench/kv_cache_agreement.py --model $M --data $D --chat --out $R/kv-agree/agree.json \
    > $R/kv-agree/log.txt 2>&1; grep -v Warning $R/kv-agree/log.txt | tail -n 22
fi
echo "== issue 20: GRPO with a KL term on conciseness (reward against KL past the β = 0 run)"
TASK=conciseness bash bench/short_runs_gpu.sh $M $DC $R/conc-beta 300 grpo "grpo.beta=0.04"
echo "== issue 20: the swept GRPO (lr 3e-6, β 0.04) for 900 s with all 2,000 records kept: ES against GRPO paired on the 2,000"
# its full-weight checkpoint cannot leave the machine, so it runs only as a hold's first step (~1,450 s of the hold)
if [ ! -f $R/grpo-h2h-tuned/results/summary.json ] && [ $SECONDS -lt 120 ]; then
  rm -rf $R/grpo-h2h-tuned  # an unfinished one from another machine: its checkpoint did not travel, so start again
  bash bench/grpo_gpu.sh $M $D $R/grpo-h2h-tuned 900 grpo.learning_rate=3e-6 grpo.beta=0.04 > $R/grpo-h2h-tuned.log 2>&1
  rm -rf $R/grpo-h2h-tuned/checkpoints/checkpoint-* $R/grpo-h2h-tuned/model
  grep -v Warning $R/grpo-h2h-tuned.log | tail -3
fi
echo "== issue 22: the search with a held-out test split and a default-LoRA baseline (~25 min: a hold's first step only)"
# its adapters stay on the machine; what travels (TAR: search-copy) is the report, scores, splits, targets, figures
if [ ! -f $R/search-copy/summary.json ] && [ $SECONDS -lt 120 ]; then
  bash bench/search_gsm8k_gpu.sh $DG $R/search $R/search-copy > $R/search.log 2>&1; tail -n 5 $R/search.log
fi
echo "== issue 21: ES on GSM8K with the forgetting check (~1.3 sessions of calls; resumes from $R/gsm8k)"
# a session's checkout is new, so a run left unfinished by an earlier session comes from where it was committed
[ ! -d $R/gsm8k ] && [ -f docs/runs/es-gsm8k-1.5b/config.yaml ] && cp -r docs/runs/es-gsm8k-1.5b $R/gsm8k
bash bench/es_gsm8k_gpu.sh $M $PWD/.stage/data $PWD/.stage/data/suite $R/gsm8k 1500 540
echo "== chain done"
