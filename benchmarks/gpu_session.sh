#!/usr/bin/env bash
# The GPU session in one command (build, Triton compiles, GPU tests, benchmarks, 7B steps; at most 7 minutes):
#   make wheels                      # on a machine with network, once: bitsandbytes for the GPU machine (git-ignored)
#   bash benchmarks/gpu_session.sh   # on the GPU machine, with wheels/ copied beside benchmarks/
# $OUT is rewritten after every stage (and every 20 s within one): session.tgz, summary.md, summary.json,
# so a command killed at a time limit still leaves what was measured. Unpack session.tgz and commit
# its results/*_cuda*.{json,md} under benchmarks/results/. `--dry-run` checks the whole script on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PY:-python3}" benchmarks/gpu_session.py "$@"
