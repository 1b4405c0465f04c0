#!/usr/bin/env bash
# The GRPO side of the ES-against-GRPO head-to-head (issue 20): Qwen2.5-Coder-1.5B-Instruct on the task of
# head_to_head_tasks.sh (TASK=countdown, the default: through the chat template, train countdown.json[:200], test
# countdown.json[-2000:], 1024 new tokens; or TASK=conciseness), training stopped at a wall-clock budget
# (grpo.max_seconds counts training only, summed over resumes; evaluation is excluded).
#
#   bench/grpo_gpu.sh MODEL DATA RUN [SECONDS] [key=value …]
#     MODEL   the model folder (no hub on the device machine)
#     DATA    countdown.json of the ES paper (TASK=conciseness: its conciseness folder)
#     RUN     the run folder; when it holds a run, that run is resumed (another machine, same budget)
#     SECONDS training budget, default 1500 (25 minutes)
#   e.g. bench/grpo_gpu.sh /models/qwen2.5-coder-1.5b-instruct countdown.json runs/grpo-cd 1500 grpo.beta=0.04
#
# A full-weight checkpoint is ~18 GB (fp32 weights and Adam's moments) and takes tens of seconds to write, so
# the run saves only when it stops (SIGTERM or grpo.max_seconds: TRL saves that step).
# Defaults are TRL's (lr 1e-6, beta 0, loss dapo, 8 completions per prompt), with 16 prompts a step so that a
# step sees a batch (TRL's default batch holds one prompt); for the sweep pass grpo.learning_rate=… grpo.beta=….
# The curves (every 10 steps, off the clock but on the machine's hold) use the first 200 test records; the
# 2,000 are scored once, on any machine, from the run folder:
#   evolm evaluate --adapter RUN --task countdown --option chat=true --data "DATA[-2000:]" --compare
#   evolm evaluate --adapter RUN --task countdown --option chat=true --data "DATA[-2000:]" --against ES_RUN
#
# The H200 image lacks trl, datasets, dill, multiprocess and pydantic: carry them as wheels (../shared/gpu/wheels.md)
# and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src
set -eu
model=$1 data=$2 run=$3 seconds=${4:-1500}
shift $(( $# < 4 ? $# : 4 ))
if [ -f "$run/config.yaml" ]; then
  # the same budget on a new machine: the clock continues from the checkpoint's
  python3 -m evolm.cli grpo --resume "$run" "grpo.max_seconds=$seconds" "$@"
else
  . "$(dirname "$0")/head_to_head_tasks.sh"
  python3 -m evolm.cli grpo "${shared[@]}" "${grpo_only[@]}" "output_dir=$run" "model.name_or_path=$model" \
    model.dtype=bfloat16 grpo.steps=10000 "grpo.max_seconds=$seconds" grpo.group_size=8 grpo.save_every=100000 \
    logging.progress=false "$@"
fi
python3 -m evolm.cli analyze "$run"
