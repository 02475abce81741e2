#!/usr/bin/env bash
# Build the circatt CUDA kernels for the present GPU, check them against float64 references and
# time them (see scripts/gpu_check.py). The full log goes to $OUT/gpu_check.log when OUT is set
# (the device tool's output folder), else to /tmp/circatt_gpu_check/gpu_check.log.
# CIRCATT_CHECK_SRC overrides the kernel folder (to check another version of the kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log_dir="${OUT:-/tmp/circatt_gpu_check}"
mkdir -p "$log_dir"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader || true
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$log_dir/${CIRCATT_CHECK_LOG:-gpu_check.log}"
