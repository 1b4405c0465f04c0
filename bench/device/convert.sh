#!/usr/bin/env bash
# The last staging call on the GPU machine: check and join the parts, turn the GGUF into a Hugging Face folder
# at /tmp/models/qwen2.5-coder-1.5b-instruct (~100 s), and install the wheels evolm needs there.
set -euo pipefail
model=/tmp/models/qwen2.5-coder-1.5b-instruct
if [ ! -f "$model/config.json" ]; then
  cp "$(ls -d .gpu/[0-9]* | tail -1)"/* /tmp/stage/
  cd /tmp/stage
  sha256sum -c --quiet SHA256SUMS || { echo "a model part is missing or damaged: stage the calls again" >&2; exit 1; }
  cat part* > model.gguf && rm part*
  python3 -m pip install -q --no-deps --target /tmp/site gguf-*.whl
  PYTHONPATH=/tmp/site python3 gguf_to_hf.py model.gguf "$model" && rm model.gguf
  cd - > /dev/null
fi
. bench/device/env.sh
python3 -c "import evolm, pydantic, trl; print('evolm ready:', evolm.__file__)"
