#!/usr/bin/env bash
# Two builds of the kernels side by side in one call: scripts/compare_builds.sh OLD
#
# OLD is a folder holding an earlier `ops/` tree, and optionally `circatt_cli/` (to time a change to the
# model's code too), made where git is (the GPU machine gets the working tree without .git):
#   mkdir -p OLD && git archive REF ops circatt_cli | tar -x -C OLD
# (untracked, so it travels with the tree; delete it afterwards). Builds both (each its own kernel cache), runs the CUDA tests on
# this tree, times the old build, then this one with --baseline (so every row shows old / new), and
# checks that the denoiser's output moved by at most 1e-4 (scripts/model_diff.py).
# Environment: DEVICE (cuda), SHAPES (train,S1,S2), OPS (similarity,adjacency,apply,attention), DTYPES
# (float32), REPEAT (20), MODEL_SIZES (512,1920x1080), SMALL (1: 64x64 model check), OUT (the device
# tool's folder, else /tmp/circatt_compare).
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/compare_builds.sh OLD  (a folder with an earlier ops/ in it)"
old=${1:?$usage}
if [ ! -f "$old/ops/__init__.py" ]; then echo "$usage: no $old/ops/__init__.py" >&2; exit 2; fi
out=${OUT:-/tmp/circatt_compare}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The GPU image has every dependency but circatt itself.
command -v circatt > /dev/null || python3 -m pip install --quiet --no-deps --no-build-isolation -e .

# The old package is imported first on the path, as circatt_ops, with its own kernel cache.
shim=$(mktemp -d)
ln -s "$(cd "$old" && pwd)/ops" "$shim/circatt_ops"
if [ -d "$old/circatt_cli" ]; then ln -s "$(cd "$old" && pwd)/circatt_cli" "$shim/circatt_cli"; fi
old_env=(env "PYTHONPATH=$shim${PYTHONPATH:+:$PYTHONPATH}" "CIRCATT_CACHE=${TMPDIR:-/tmp}/circatt_cache_old")
load='import torch, circatt_ops as ca; x = torch.randn(1, 8, 16, 16, device="'$device'"); ca.adjacency(x, x, 3).apply(x); print("built", ca.__file__)'
start=$(date +%s)
python3 -c "$load" & "${old_env[@]}" python3 -c "$load" & wait
echo "both builds ready in $(( $(date +%s) - start )) s"

status=0
if [ "$device" = cuda ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -X faulthandler -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py \
        2>&1 | tail -15 | tee "$out/cuda_tests.log" || status=1
fi
bench=(circatt bench --device "$device" --shapes "${SHAPES:-train,S1,S2}" --ops "${OPS:-similarity,adjacency,apply,attention}"
       --impls "$device" --dtype "${DTYPES:-float32}" --repeat "${REPEAT:-20}")
"${old_env[@]}" "${bench[@]}" --json "$out/old.json" > "$out/old.log" 2>&1 || status=1
"${bench[@]}" --json "$out/new.json" --baseline "$out/old.json" 2>&1 | tee "$out/new.log" | tail -40 || status=1
model=(circatt bench --device "$device" --ops model --model-sizes "${MODEL_SIZES:-512,1920x1080}" --repeat 10)
"${old_env[@]}" "${model[@]}" --json "$out/model-old.json" > "$out/model-old.log" 2>&1 || status=1
"${model[@]}" --json "$out/model-new.json" --baseline "$out/model-old.json" 2>&1 | tail -20 || status=1
small=(); [ -n "${SMALL:-}" ] && small=(--small)
"${old_env[@]}" python3 scripts/model_diff.py save "$out/model-old.pt" --device "$device" "${small[@]}" || status=1
python3 scripts/model_diff.py compare "$out/model-old.pt" --device "$device" "${small[@]}" || status=1
rm -f "$out/model-old.pt"
exit $status
