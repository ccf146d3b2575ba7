#!/usr/bin/env bash
# What a lent GPU machine should do for this project, in as few device calls as possible:
#   run(command="bash benchmarks/gpu_session.sh kernels", timeout_s=600)   # build, GPU tests, kernel benchmarks
#   run(command="bash benchmarks/gpu_session.sh train",   timeout_s=600)   # 7B (G=4) and 1B (G=8) PairGRPO steps on one GPU
# Each stage records the GPU and versions, (re)builds pairuni_kernels._C with the CUDA sources against
# the machine's torch (no registry there: --no-deps), and leaves its results under $OUT
# (at most 8 files come back, so results are packed). Commit the unpacked
# benchmarks/results/*_cuda.{json,md} afterwards; their tables name the GPU.
set -uo pipefail
STAGE=${1:-kernels}
OUT=${OUT:-/tmp/pairuni_out}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

FORCE_CUDA=1 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
$PY -c "from pairuni_kernels._ext import has_extension; print('extension', has_extension())"

case "$STAGE" in
  kernels)
    timeout 200 $PY -m pytest -q -x tests/test_policy_loss.py tests/test_advantages.py tests/test_linear_logprobs.py \
      tests/test_sampling.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/tests.log"
    timeout 300 $PY benchmarks/run_all.py --device cuda --only policy_loss advantages linear sampling \
      --out "$OUT/results" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?"
    tar czf "$OUT/results.tgz" -C "$OUT" results
    tail -60 "$OUT"/results/SUMMARY_cuda.md 2>/dev/null
    ;;
  train)
    # issue 7: random weights with exact Janus-Pro shapes; peak memory, rollout / update / step time
    timeout 500 $PY benchmarks/train_one_gpu.py --steps 3 > "$OUT/bench_7b.log" 2>&1
    echo "train_one_gpu rc=$?"; tail -20 "$OUT/bench_7b.log"
    ;;
  *) echo "usage: gpu_session.sh kernels|train"; exit 2 ;;
esac
