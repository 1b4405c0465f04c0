#!/usr/bin/env bash
# The GPU runs still owed to the open issues, in priority order, for one lent machine: each step resumes or skips
# what is already done under /tmp/runs. Start it with bg.sh (README.md); its results go to docs/ afterwards.
set -u
. bench/device/env.sh
R=/tmp/runs
mkdir -p $R
# a hold that ended mid-chain: the last call's $OUT/chain.tgz, copied here as .stage/chain.tgz, continues it
[ -f .stage/chain.tgz ] && [ -z "$(ls -A $R)" ] && tar -C $R -xzf .stage/chain.tgz
echo "== issue 18: the tail row again, with a draining batch split into pieces (same command as docs/runs/tail-countdown-1.5b-3)"
if [ ! -f $R/tail4/tail-row.txt ]; then
  if [ -f $R/tail4/config.yaml ]; then python3 -m evolm.cli es --resume $R/tail4
  else python3 -m evolm.cli es countdown model.name_or_path=$M "task.train=$D[:200]" "task.test=$D[-2000:-1500]" \
      task.test_size=200 space.kind=full-lowrank space.rank=8 es.generations=22 eval.every=0 export=false \
      logging.progress=false output_dir=$R/tail4; fi
  python3 bench/engine_gpu.py --history $R/tail4/results/history.jsonl | tee $R/tail4/tail-row.txt
fi
echo "== issue 18: the reasoning and fixed-length rows with the same engine (chunked layout, shared prefix)"
engine_row() {  # NAME ARGS…: one bench/engine_gpu.py row into $R/NAME (its log holds the JSON before the reference)
  local name=$1; shift
  [ -f $R/$name/done ] && return
  mkdir -p $R/$name
  timeout 330 python3 bench/engine_gpu.py --model $M --data $D --space full-lowrank --rank 8 --out $R/$name "$@" \
    > $R/$name/log.txt 2>&1
  touch $R/$name/done
  grep -E "^device|^generation|tok|seconds|identical" $R/$name/log.txt | tail -n 20
}
engine_row chat-row --chat --stop '</answer>' --generations 2 --skip-plain --reference-prompts 1
echo "== issue 18: the fixed-length row with today's engine"
engine_row fixed-row --max-new-tokens 256 --reference-prompts 1
echo "== issue 18: the reasoning row again, stop checks detokenising only rows that may have completed one"
engine_row chat-row2 --chat --stop '</answer>' --generations 1 --skip-plain --reference-prompts 1
echo "== issue 20: GRPO learning-rate and β sweep on chat countdown, 300 s each (lr 1e-5 collapsed: docs/results.md)"
bash bench/short_runs_gpu.sh $M $D $R/sweep 300 grpo "grpo.learning_rate=3e-6" "grpo.learning_rate=3e-6 grpo.beta=0.04"
echo "== issue 20: conciseness GRPO again, now that a non-finite step is skipped (ES's side: docs/runs/es-conciseness-1.5b-h2h)"
TASK=conciseness bash bench/es_vs_grpo_gpu.sh $M $DC $R/conc 300 900 grpo
echo "== issue 20: GRPO with a KL term on conciseness (reward against KL past the β = 0 run)"
TASK=conciseness bash bench/short_runs_gpu.sh $M $DC $R/conc-beta 300 grpo "grpo.beta=0.04"
echo "== issue 18: the fixed-length row again, two generations (the first, on a fresh machine, left the device idle 4.8 s)"
engine_row fixed-row2 --max-new-tokens 256 --generations 2 --reference-prompts 1
echo "== issue 21: ES on GSM8K with the forgetting check (~1.3 sessions of calls; resumes from $R/gsm8k)"
bash bench/es_gsm8k_gpu.sh $M $PWD/.stage/data $PWD/.stage/data/suite $R/gsm8k 1500 540
echo "== chain done"
