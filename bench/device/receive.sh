#!/usr/bin/env bash
# A staging call on the GPU machine: keep the model parts that travelled with this call.
set -euo pipefail
mkdir -p /tmp/stage && cp .gpu/[0-9]*/part* /tmp/stage/ && ls /tmp/stage | wc -l
