#!/usr/bin/env bash
# Several `evolm es` runs side by side on one GPU for SECONDS, resumable across calls and machines.
#   bench/es_runs_gpu.sh SECONDS PRESET NAME "OVERRIDES" [NAME "OVERRIDES" ...]
# A run folder already under $RUNS (or in .stage/runs.tgz, brought back from an earlier machine) is resumed.
# Afterwards the small run folders (no exported model) are packed into $OUT/runs.tgz.
set -u
seconds=$1 preset=$2; shift 2
RUNS=${RUNS:-/tmp/runs}
mkdir -p "$RUNS"
[ -f .stage/runs.tgz ] && [ ! -f "$RUNS/.unpacked" ] && tar xzf .stage/runs.tgz -C "$RUNS" && touch "$RUNS/.unpacked"
while [ $# -ge 2 ]; do
  name=$1 overrides=$2; shift 2
  if [ -f "$RUNS/$name/config.yaml" ]; then
    cmd="python3 -m evolm.cli es --resume $RUNS/$name"
  else
    cmd="python3 -m evolm.cli es $preset output_dir=$RUNS/$name logging.progress=false $overrides"
  fi
  echo "$name: $cmd"
  (timeout -s TERM "$seconds" $cmd >> "$RUNS/$name.log" 2>&1; echo "exit $? after $SECONDS s" >> "$RUNS/$name.log") &
  sleep 2
done
wait
for log in "$RUNS"/*.log; do echo "== $log"; grep -v Warning "$log" | tail -4; done
for h in "$RUNS"/*/results/evaluations.jsonl; do echo "== $h"; cut -c1-160 "$h"; done
[ -n "${OUT:-}" ] && tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude=model --exclude=adapter .
exit 0
