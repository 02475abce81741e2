#!/usr/bin/env bash
# On a GPU machine: build the CUDA kernels for the present GPU, run the CUDA tests (fresh random inputs,
# outputs poisoned with NaN, gradcheck), then time the issue shapes against the peers with circatt bench.
# Logs and the bench's JSON/CSV go to $OUT (the device tool's folder) or /tmp/circatt_gpu_check.
# Environment: SHAPES, OPS, DTYPES, REPEAT, TEST_TIMEOUT, BENCH_TIMEOUT, and BASELINE (an earlier run's
# bench.json, e.g. from docs/results/: each row is also shown against the same row there).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/circatt_gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true

# The GPU image already has every dependency: install circatt itself only.
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
start=$(date +%s)
python3 -c "import torch, circatt_ops as ca; x = torch.randn(1, 2, 8, 8, device='cuda'); ca.adjacency(x, x, 3)"
echo "CUDA kernels built/loaded in $(( $(date +%s) - start )) s"

# Each stage is bounded and logged as it runs (tee), and a failing stage does not stop the next one:
# a cut-off or crashed stage still leaves its lines in $out.
status=0
timeout "${TEST_TIMEOUT:-300}" python3 -X faulthandler -m pytest -q -rfE -p no:cacheprovider \
    tests/test_cuda.py tests/test_bccb.py 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout "${BENCH_TIMEOUT:-400}" circatt bench --device cuda --shapes "${SHAPES:-train,S1,S2}" \
    --ops "${OPS:-similarity,adjacency,apply,attention,step}" --dtype "${DTYPES:-float32,bfloat16}" \
    --repeat "${REPEAT:-20}" --json "$out/bench.json" --csv "$out/bench.csv" ${BASELINE:+--baseline "$BASELINE"} \
    2>&1 | tee "$out/bench.log" || status=1
exit $status
