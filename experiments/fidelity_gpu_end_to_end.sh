#!/usr/bin/env bash
# Proxy side of the fidelity study for the END-TO-END proxy (proxy_eval=end_to_end) on one GPU:
# every architecture of experiments/search_quality/fidelity_archs.json trained as a whole detector
# on the proxy split of the default training experiment's synthetic data (proxy-val: 128 images of
# the training split, proxy-train: the other 896), batch 16, at each of PROXY_ITERS iterations (each
# budget its own run with its own cosine schedule), JOBS processes at a time. Scores (AP and proxy-val
# loss, mean over PROXY_SEEDS) are kept in experiments/search_quality/gpu_proxy_e2e/<NAME>/<label>.json;
# budgets already there are not recomputed, so a run cut by LIMIT continues when run again.
#   carry: [".whl"]      command: bash experiments/fidelity_gpu_end_to_end.sh
#   then:  PYTHONPATH=. python experiments/search_quality.py fidelity --archs-file experiments/search_quality/fidelity_archs.json \
#            --proxy-dir experiments/search_quality/gpu_proxy_e2e/split0 --ground-truth experiments/search_quality/gpu_ground_truth \
#            --proxy-iters 150 300 600 --name fidelity-gpu-e2e
# Env: NAME (split0), PROXY_ITERS ("150 300 600"), PROXY_SEEDS ("0"), JOBS (12), LIMIT (540 s), MPS (1: start
#      CUDA MPS first, experiments/gpu_mps.sh),
#      EXTRA (more proxy overrides, e.g. "proxy_eval.split_seed=1"),
#      REGIME (scratch: the former ResNet-18 default and fidelity_archs.json; pretrained: the search's
#      own default task and backbone, pretrained EfficientNet-Lite0, width 64 as in the default training,
#      the archs of search_quality/pretrained/archs.json, scores under search_quality/pretrained/e2e/<NAME>).
set -u
OUT=${OUT:-/tmp/fidelity_gpu_e2e}
NAME=${NAME:-split0}
PROXY_ITERS=${PROXY_ITERS:-150 300 600}
PROXY_SEEDS=${PROXY_SEEDS:-0}
JOBS=${JOBS:-12}
LIMIT=${LIMIT:-540}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
export OMP_NUM_THREADS=1
if [ "${MPS:-0}" = 1 ]; then   # the trials' kernels overlap on the GPU instead of taking turns
  # shellcheck source=experiments/gpu_mps.sh
  source experiments/gpu_mps.sh "$OUT/mps.txt"
fi
REGIME=${REGIME:-scratch}
ARCHS=experiments/search_quality/fidelity_archs.json
STORE=gpu_proxy_e2e
DATA="data.num_train=1024 data.num_val=128 data.image_min_side=64 data.image_max_side=128 data.large_every=0 data.max_objects=4 data.min_object_size=16"
# the training experiment's model: ResNet-18 with batch statistics, width 64
MODEL="backbone.norm=bn backbone.frozen_stages=-1 model.width=64"
if [ "$REGIME" = pretrained ]; then
  ARCHS=experiments/search_quality/pretrained/archs.json
  STORE=pretrained/e2e
  DATA=""
  MODEL="model.width=64"
fi
PROXY="proxy_eval=end_to_end proxy_eval.val_images=128 proxy_eval.batch_size=16 proxy_eval.timeout_s=1200"
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$LIMIT" python3 experiments/search_quality.py fidelity --proxy-only --device cuda --jobs "$JOBS" \
  --archs-file "$ARCHS" --work /tmp/sq-e2e --out /tmp/sqout-e2e \
  --cache-dir /tmp/sq-e2e-cache --proxy-dir "experiments/search_quality/$STORE/$NAME" \
  --proxy-iters $PROXY_ITERS --proxy-seeds $PROXY_SEEDS --search $DATA $MODEL $PROXY "${EXTRA[@]}" > "$OUT/$NAME.log" 2>&1
echo "$NAME rc=$? $(( SECONDS - t0 )) s" | tee -a "$OUT/$NAME.log"
tar czf /tmp/p.tgz -C experiments/search_quality "$STORE" && mv /tmp/p.tgz "$OUT/$(basename "$STORE")-$NAME.tgz"
