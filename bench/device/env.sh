# Sourced at the start of every device command: the wheels evolm needs (installed once a machine), evolm from this
# tree, and the usual paths: M the model, D the countdown file, DC the conciseness folder, DG the GSM8K rows.
[ -f /tmp/site/.evolm-wheels ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.evolm-wheels; }
export PYTHONPATH=/tmp/site:$PWD/src
export M=/tmp/models/qwen2.5-coder-1.5b-instruct
export D=$PWD/.stage/data/countdown.json DC=$PWD/.stage/data/conciseness DG=$PWD/.stage/data/gsm8k_train.jsonl
