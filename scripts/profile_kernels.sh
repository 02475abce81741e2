#!/usr/bin/env bash
# Nsight Compute profile of the CUDA kernels at one shape (docs/kernels.md, open problems 2-3):
#     scripts/profile_kernels.sh [train|S1|S2]     (KERNELS: a regex of kernel names, default all of ours;
#     DTYPE: float32 (default), bfloat16 or float16; TF32=1 allows TF32, as torch.backends.cuda.matmul.allow_tf32)
# On the GPU machine (Firecracker runtime: ncu reads the counters there). Profiles one call of each
# entry point (similarity, apply, apply transposed, fused forward, fused backward) after a warm-up,
# bracketing the profiled round with cudaProfilerStart/Stop so that the backward's launches from
# autograd's thread are caught too (an NVTX range caught only the forward's), with the sections that say what bounds a kernel: speed of light, occupancy, launch statistics, memory
# workload, scheduler and warp-state statistics. The clocks are left alone (--clock-control none).
# Writes $OUT/profile-SHAPE.ncu-rep and its details page as text, $OUT/profile-SHAPE.txt (every
# section's metrics and ncu's own remarks, per kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-train}
out=${OUT:-/tmp/circatt_profile}
mkdir -p "$out"
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
case "$shape" in
    train) args="12 64 64 64 35 1 distance" ;;
    S1) args="2 64 128 96 15 1 dot" ;;
    S2) args="1 64 256 256 35 1 distance" ;;
    *) echo "usage: scripts/profile_kernels.sh [train|S1|S2]" >&2; exit 2 ;;
esac
cat > /tmp/circatt_profile_calls.py <<'PY'
import sys
import torch
import circatt_ops as ca

B, C, H, W, window, heads = map(int, sys.argv[1:7])
kind, dtype, tf32 = sys.argv[7], getattr(torch, sys.argv[8]), sys.argv[9] == "1"
torch.backends.cuda.matmul.allow_tf32 = tf32
q, k, v = (torch.randn(B, C, H, W, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
for i in range(2):  # round 0: warm-up (and the build); round 1: profiled, backward included
    if i == 1:
        torch.cuda.profiler.start()  # ncu runs with --profile-from-start off
    A = ca.adjacency(q, k, window, kind=kind, heads=heads)
    y = A.apply(v) + A.apply_transposed(v)
    y = y + ca.attention(q, k, v, window, kind=kind, heads=heads)
    y.sum().backward()
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
PY
ncu --clock-control none --kernel-name-base demangled --kernel-name "regex:${KERNELS:-circatt::}" --profile-from-start off \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    -o "$out/profile-$shape" -f python3 /tmp/circatt_profile_calls.py $args "${DTYPE:-float32}" "${TF32:-0}"
ncu --import "$out/profile-$shape.ncu-rep" --page details --print-units base > "$out/profile-$shape.txt"
grep -E "circatt::|Duration|Compute \\(SM\\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Size|Dynamic Shared" "$out/profile-$shape.txt" | head -120
