#!/usr/bin/env bash
# Export an ES countdown run's model and compare it with its base, per example, on held-out records: with the
# paper's raw prompt and through the chat template (task option chat=true). Reports go to $OUT.
#   bench/es_compare_gpu.sh RUN DATA
set -eu
run=$1 data=$2
name=$(basename "$run") model=/tmp/$(basename "$run")-model
python3 -m evolm.cli export "$run" "$model"
python3 -m evolm.cli evaluate --adapter "$model" --task countdown --data "$data" --compare \
  --output "$OUT/$name-compare.json"
python3 -m evolm.cli evaluate --adapter "$model" --task countdown --option chat=true --data "$data" --compare \
  --output "$OUT/$name-chat-compare.json"
