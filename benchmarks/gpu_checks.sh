#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device (the project's standing
# order): the Triton operator benchmark, the `gpu` tests, and every Triton kernel test run on
# the device itself (without a GPU these run under TRITON_INTERPRET=1). Logs and the
# benchmark's soft_topk_gpu.{md,json} go to $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_checks.sh            # with the repository root as working directory
#
# Then, as a second command where the lease allows (about 3 minutes), the forward's tile sweep:
#   python benchmarks/sweep_triton_launch.py --max-seconds 200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    uptime
} 2>&1 | tee "$OUT/env.txt"
status=0
timeout "${BENCH_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_soft_topk_gpu.py --out "$OUT" 2>&1 \
    | tee "$OUT/bench_soft_topk_gpu.log" || status=1
timeout "${TEST_TIMEOUT:-150}" "$PYTHON" -m pytest -p no:cacheprovider -q -m gpu \
    tests/ops/test_soft_topk_triton.py tests/test_moe.py tests/test_metrics.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" || status=1
timeout "${TEST_TIMEOUT:-150}" "$PYTHON" -m pytest -p no:cacheprovider -q -m "not gpu" \
    tests/ops/test_soft_topk_triton.py 2>&1 | tee "$OUT/pytest_triton_on_device.log" || status=1
exit $status
