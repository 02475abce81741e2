#!/usr/bin/env bash
# Multi-GPU scaling of `circatt train`: scripts/scaling.sh PRESET "1 2 4" [MINUTES]
#
# On a GPU machine with data_cache/CBSD432.npz carried: builds the kernels once, then runs a short chunk of
# the same training (from the committed checkpoint, same per-GPU batch) on 1, 2, ... GPUs and prints the
# images/s of each and the efficiency against linear scaling. By default nothing is kept but the table;
# with RUN=runs/PRESET (and STEPS, EXTRA as for train_gpu.sh) the chunks continue that real run instead.
set -euo pipefail
PRESET=${1:?usage: scripts/scaling.sh gray|color "1 2 4" [MINUTES]}
COUNTS=${2:-1 2 4}
MINUTES=${3:-1}
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e .
python -c "import torch, circatt_ops as ca; x = torch.randn(1, 2, 8, 8, device='cuda'); ca.adjacency(x, x, 3)"
declare -A ips
for n in $COUNTS; do
    gpus=$(seq -s, 0 $((n - 1)))
    dir=${RUN:-/tmp/circatt_scaling/$PRESET-$n}
    [ -n "${RUN:-}" ] || rm -rf "$dir"
    mkdir -p /tmp/circatt_scaling
    log=/tmp/circatt_scaling/$PRESET-$n.log
    CUDA_VISIBLE_DEVICES=$gpus RUN=$dir OUT=$dir/export MAX_MINUTES=$MINUTES \
        scripts/train_gpu.sh "$PRESET" "${STEPS:-20000}" > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
    ips[$n]=$(python -c "import json,sys; e=[json.loads(l) for l in open(sys.argv[1])]; print([x for x in e if x['event']=='end'][-1]['images_per_s'])" "$dir/log.jsonl")
done
first=${COUNTS%% *}
echo "GPUs  images/s  speed-up  efficiency   ($PRESET, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
for n in $COUNTS; do
    python -c "import sys; n,i,f,i0=int(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),float(sys.argv[4]); s=i/i0; print(f'{n:>4}  {i:8.1f}  {s:8.2f}  {s/(n/f):9.0%}')" "$n" "${ips[$n]}" "$first" "${ips[$first]}"
done
