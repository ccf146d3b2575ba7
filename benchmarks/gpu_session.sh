#!/usr/bin/env bash
# Everything a lent GPU machine should do for this project, in ONE device call (device time is short):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# 1. records the GPU, driver and library versions;
# 2. builds pairuni_kernels._C with the CUDA sources (nvcc there; FORCE_CUDA=1) against the machine's torch;
# 3. runs the test suite on the GPU (CUDA-only tests included, interpreter-only ones still run on CPU);
# 4. runs every benchmark suite at full size and packs results under $OUT (at most 8 files come back).
# Commit the unpacked benchmarks/results/*_cuda.{json,md} afterwards with the GPU name in the table.
set -uo pipefail
OUT=${OUT:-/tmp/pairuni_out}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the machine has no registry: build with what is there; never let pip resolve dependencies
FORCE_CUDA=1 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import pairuni_kernels, torch; from pairuni_kernels._ext import has_extension; print('extension', has_extension())"

timeout 240 $PY -m pytest -q -x tests/test_policy_loss.py tests/test_advantages.py tests/test_linear_logprobs.py \
  tests/test_sampling.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"

timeout 300 $PY benchmarks/run_all.py --device cuda --out "$OUT/results" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tar czf "$OUT/results.tgz" -C "$OUT" results
cat "$OUT"/results/SUMMARY_cuda.md 2>/dev/null | tail -60
