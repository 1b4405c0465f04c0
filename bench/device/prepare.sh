#!/usr/bin/env bash
# Run here (CPU, in the repository root) before a session's first device call: what the lent GPU machine lacks,
# cut to fit its calls (the working tree that travels is capped at 64 MiB, tracked files included).
#   .gpu/00 … .gpu/NN  the Qwen2.5-Coder-1.5B-Instruct GGUF (../shared/gpu/stage_model.py) in 46 MiB parts; the
#                      last folder also holds the converter and the gguf wheel
#   .whl/              the wheels of ../shared/gpu/wheels.md (pydantic for evolm, trl for grpo, math-verify)
#   .stage/data/       the paper's data files, read there (never committed: their licences forbid shipping them),
#                      and suite/: its math evaluation suite as JSONL (bench/suite_to_jsonl.py)
# All three are in .gitignore. Then: bench/device/README.md.
set -euo pipefail
shared=${SHARED:-../shared}
# the suite conversion at the end reads parquet through evolm[datasets]: fail now, not after the downloads
python3 -c "import evolm, datasets" 2> /dev/null || { echo "prepare.sh: python3 needs evolm[datasets] (activate the venv)" >&2; exit 1; }
python3 "$shared/gpu/stage_model.py" qwen2.5-coder-1.5b-instruct --out .gpu-raw > /dev/null
rm -rf .gpu && mkdir -p .gpu
cat .gpu-raw/[0-9]*/part* | split -b 46M -d -a 2 - .gpu/part
for part in .gpu/part*; do n=${part#.gpu/part}; mkdir -p ".gpu/$n" && mv "$part" ".gpu/$n/"; done
last=$(ls -d .gpu/[0-9]* | tail -1)
mv .gpu-raw/*/gguf_to_hf.py .gpu-raw/*/gguf-*.whl "$last/"
for d in .gpu/[0-9]*; do (cd "$d" && sha256sum part*); done > SHA256SUMS && mv SHA256SUMS "$last/"
rm -rf .gpu-raw
rm -rf .whl && mkdir -p .whl
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -q --platform manylinux_2_28_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl"
python3 -m pip download $P pydantic pydantic-core annotated-types typing-inspection typing_extensions
python3 -m pip download $P math-verify latex2sympy2_extended "antlr4-python3-runtime==4.13.2"
python3 -m pip download $P trl==1.16.0 datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18
rm -rf .stage/data && mkdir -p .stage/data
cp -r "$shared/data/es-paper/countdown.json" "$shared/data/es-paper/conciseness" "$shared/data/es-paper/gsm8k_train.jsonl" \
      "$shared/data/es-paper/es-at-scale" .stage/data/
python3 bench/suite_to_jsonl.py .stage/data/es-at-scale/datasets/evaluation_suite/math .stage/data/suite \
    --gsm8k .stage/data/gsm8k_train.jsonl  # the math suite as JSONL (needs evolm[datasets] here)
parts=$(ls -d .gpu/[0-9]* | wc -l)
echo "staged: $parts parts ($(du -sh .gpu | cut -f1)), wheels $(du -sh .whl | cut -f1), data $(du -sh .stage/data | cut -f1)"
echo "device calls: NN = 00 … $(printf %02d $((parts - 2))): carry [\".gpu/NN\"], command: bash bench/device/receive.sh"
echo "then carry [\"${last}\", \".whl\", \".stage\"], command: bash bench/device/convert.sh; <the first run>"
