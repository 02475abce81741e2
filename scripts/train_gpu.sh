#!/usr/bin/env bash
# One chunk of GPU training, resumable: scripts/train_gpu.sh PRESET STEPS
#
# Run from the repository root on the GPU machine, with data_cache/CBSD432.npz carried (make it with
# `python scripts/pack_data.py`) and runs/PRESET/last.pt carried when continuing. Uses every visible GPU
# (torchrun + DDP over NCCL when there are several), stops cleanly after MAX_MINUTES (default 7) with a
# checkpoint, copies the checkpoint and the log to $OUT, and prints the measured throughput. A fresh
# checkout continues from the committed checkpoints/groupcdl-PRESET-last.pt; copy $OUT/last.pt back
# there (and its log to checkpoints/groupcdl-PRESET-log.jsonl) to keep a chunk's progress.
# STEPS is the total of the whole run (the learning-rate schedule spans it), not of this chunk.
# Environment: MAX_MINUTES, DATA (default data_cache/CBSD432.npz), BATCH (per GPU, default 12), RUN (default
# runs/PRESET), EXTRA (more flags), OMP_NUM_THREADS (default 4 for a single-process run), EVAL (folders of
# clean test images, space-separated: after the chunk, its weights are exported to $OUT/PRESET.safetensors and
# scored by `circatt eval` at sigma 15, 25 and 50 into $OUT/eval.json; EVAL_DEVICE, default cuda).
# CUDA_VISIBLE_DEVICES picks the GPUs (two chunks can share a machine).
set -euo pipefail

usage="usage: scripts/train_gpu.sh gray|color STEPS"
PRESET=${1:?$usage}
STEPS=${2:?$usage}
MAX_MINUTES=${MAX_MINUTES:-7}
DATA=${DATA:-data_cache/CBSD432.npz}
BATCH=${BATCH:-12}
RUN=${RUN:-runs/$PRESET}
OUT=${OUT:-$RUN/export}

case "$PRESET" in gray|color) ;; *) echo "$usage" >&2; exit 2 ;; esac
if [ ! -e "$DATA" ]; then
    echo "no training data at $DATA: run 'python scripts/pack_data.py' and carry data_cache/" >&2
    exit 2
fi

# Import the packages from this tree without installing anything: circatt_ops lives in ops/.
mkdir -p "$RUN/python" "$OUT"
ln -sfn "$PWD/ops" "$RUN/python/circatt_ops"
ln -sfn "$PWD/circatt_cli" "$RUN/python/circatt_cli"
export PYTHONPATH="$PWD/$RUN/python${PYTHONPATH:+:$PYTHONPATH}"
# torchrun needs a file to run: a two-line launcher of the CLI.
LAUNCHER=$RUN/python/launch_circatt.py
printf 'from circatt_cli.app import main\nmain()\n' > "$LAUNCHER"

ARGS=(train "$DATA" --preset "$PRESET" --out "$RUN" --steps "$STEPS" --batch "$BATCH"
      --max-minutes "$MAX_MINUTES" --checkpoint-minutes 2 --log-every 50)
if [ ! -f "$RUN/last.pt" ] && [ -f "checkpoints/groupcdl-$PRESET-last.pt" ]; then
    cp "checkpoints/groupcdl-$PRESET-last.pt" "$RUN/last.pt"
    cp "checkpoints/groupcdl-$PRESET-log.jsonl" "$RUN/log.jsonl" 2>/dev/null || true
fi
if [ -f "$RUN/last.pt" ]; then
    ARGS+=(--resume)
    echo "resuming from $RUN/last.pt"
fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA:-})

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
echo "preset $PRESET, $NGPU GPU(s), batch $BATCH per GPU, total steps $STEPS, chunk <= $MAX_MINUTES min"
START=$(date +%s)
if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" "$LAUNCHER" "${ARGS[@]}"
else
    # a lone process starts one thread per core (torchrun sets 1): beside another run it got 28.9 vs 77.0 images/s
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} python "$LAUNCHER" "${ARGS[@]}"
fi
echo "chunk wall time: $(( $(date +%s) - START )) s"

cp "$RUN/last.pt" "$RUN/log.jsonl" "$OUT/"
python - "$RUN/log.jsonl" <<'PY'
import json, sys
ends = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "end"]
e = ends[-1]
print(f"throughput: {e['images_per_s']:.1f} images/s, {e['steps_per_s']:.3f} steps/s "
      f"({e['world']} GPU(s) x batch {e['batch_per_process']}); now at step {e['step']} (+{e['steps_this_run']}); "
      f"peak GPU memory {e.get('max_memory_gib', 0):.1f} GiB (rank 0)")
PY

if [ -n "${EVAL:-}" ]; then
    python scripts/export_weights.py "$RUN/last.pt" "$OUT/$PRESET.safetensors"
    EVAL_ARGS=()
    for folder in $EVAL; do EVAL_ARGS+=(--data "$folder"); done
    python "$LAUNCHER" eval --model "$OUT/$PRESET.safetensors" "${EVAL_ARGS[@]}" --sigma 15,25,50 \
        --device "${EVAL_DEVICE:-cuda}" --json "$OUT/eval.json"
fi
