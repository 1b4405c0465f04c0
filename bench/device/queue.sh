#!/usr/bin/env bash
# The GPU runs still owed to the open issues, in priority order, for one lent machine: each step resumes or skips
# what is already done under /tmp/runs. Start it with bg.sh (README.md); its results go to docs/ afterwards.
set -u
# the run folders (and logs) under /tmp/runs that the steps below write: poll.sh packs these when TAR is not given
# QUEUE_FOLDERS: search-copy search.log chat-row3 gsm8k gsm8k.log grpo-h2h-tuned grpo-h2h-tuned.log
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
echo "== issue 22: the search with a held-out test split and a default-LoRA baseline (a hold's first step only)"
# its adapters stay on the machine; what travels (TAR: search-copy) is the report, scores, splits, targets, figures.
# it must fit a hold after the staging (400-500 s of 1,800): the variants get 400 s (evolution.max_seconds; the
# generation in progress when it is spent runs to its end: at 120 s a variant generation 0 alone is ~480 s), the
# sampling, baseline and test split ~350 s; a run cut by its timeout leaves its history and log in search-copy,
# to size the next try
if [ ! -f $R/search-copy/summary.json ] && [ $SECONDS -lt 120 ]; then
  timeout 1200 bash bench/search_gsm8k_gpu.sh $DG $R/search $R/search-copy evolution.max_seconds=400 > $R/search.log 2>&1 \
    || { mkdir -p $R/search-copy/cut; cp $R/search/results/history.jsonl $R/search/logs/search.log $R/search-copy/cut/; }
  tail -n 5 $R/search.log
fi
echo "== issue 18: the exact reasoning row in a run's steady state (second generation), the prefix kernel removed"
engine_row chat-row3 --chat --stop '</answer>' --generations 2 --skip-plain --reference-prompts 1
echo "== issue 20: the swept GRPO (lr 3e-6, β 0.04) for 900 s with all 2,000 records kept: ES against GRPO paired on the 2,000"
# its full-weight checkpoint cannot leave the machine, so it runs only as a hold's first step (~1,450 s of the hold)
if [ ! -f $R/grpo-h2h-tuned/results/summary.json ] && [ $SECONDS -lt 120 ]; then
  rm -rf $R/grpo-h2h-tuned  # an unfinished one from another machine: its checkpoint did not travel, so start again
  bash bench/grpo_gpu.sh $M $D $R/grpo-h2h-tuned 900 grpo.learning_rate=3e-6 grpo.beta=0.04 > $R/grpo-h2h-tuned.log 2>&1
  rm -rf $R/grpo-h2h-tuned/checkpoints/checkpoint-* $R/grpo-h2h-tuned/model
  grep -v Warning $R/grpo-h2h-tuned.log | tail -3
fi
echo "== issue 21: ES on GSM8K with the forgetting check (~1.3 sessions of calls; resumes from $R/gsm8k)"
# a session's checkout is new, so a run left unfinished by an earlier session comes from where it was committed
[ ! -d $R/gsm8k ] && [ -f docs/runs/es-gsm8k-1.5b/config.yaml ] && cp -r docs/runs/es-gsm8k-1.5b $R/gsm8k
bash bench/es_gsm8k_gpu.sh $M $PWD/.stage/data $PWD/.stage/data/suite $R/gsm8k 1500 540
echo "== chain done"
