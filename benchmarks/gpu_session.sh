#!/usr/bin/env bash
# The GPU session in one device call (build, GPU tests, benchmarks, 7B step; at most 9 minutes):
#   make wheels    # here, once: bitsandbytes for the GPU machine, git-ignored
#   run(command="bash benchmarks/gpu_session.sh", carry=["wheels"], timeout_s=600)
# Results are packed into $OUT (session.tgz, summary.md, summary.json); unpack session.tgz and commit
# its results/*_cuda.{json,md} under benchmarks/results/. `--dry-run` checks the whole script on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PY:-python3}" benchmarks/gpu_session.py "$@"
