#!/usr/bin/env bash
# Issue #20's headline search on one GPU: the default two-stage search (PPO, fpn stage then head
# stage) with the proxy that ranks in the pretrained regime (proxy_eval=end_to_end, reward=auto ->
# the proxy-val loss), through Ray, WORKERS trials sharing the GPU, the decoder at the default
# training's width (model.width=64), so that its best code is retrained by experiments/pretrained_gt_gpu.sh
# as it was searched. Its run directory comes back as one archive, $OUT/search_run.tgz; a run cut by
# LIMIT continues from that archive in the next call (RESUME=<path of the archive in the repository>).
#   carry: [".whl"]  (with Ray: experiments/gpu_env.sh says how Ray travels)
#   command: MPS=1 bash experiments/headline_search_gpu.sh
# Env: BUDGET (trials per stage, 24), WORKERS (10), LIMIT (seconds, 500), MPS (1: start CUDA MPS,
#      experiments/gpu_mps.sh), RESUME (an earlier call's search_run.tgz), EXTRA (more overrides).
set -u
OUT=${OUT:-/tmp/headline_search}
RUN=/tmp/headline_search_run/run
BUDGET=${BUDGET:-24}
WORKERS=${WORKERS:-10}
LIMIT=${LIMIT:-500}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT" /tmp/headline_search_run
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
export OMP_NUM_THREADS=1
if [ "${MPS:-0}" = 1 ]; then
  # shellcheck source=experiments/gpu_mps.sh
  source experiments/gpu_mps.sh "$OUT/mps.txt"
fi
if [ -n "${RESUME:-}" ]; then   # the archive holds run/ (the run directory of the earlier call)
  tar xzf "$RESUME" -C /tmp/headline_search_run
  ARGS=("resume=$RUN")   # the run keeps its own settings (config.yaml)
else   # a fresh search: a warm machine may still hold an earlier call's run (already in that call's $OUT)
  rm -rf /tmp/headline_search_run/run
  ARGS=(proxy_eval=end_to_end executor=ray device=cuda model.width=64 "search.budget=$BUDGET"
        "search.workers=$WORKERS" "ray.gpus_per_trial=$(python3 -c "print(round(1 / $WORKERS, 4))")"
        ray.cpus_per_trial=1 "search.run_dir=$RUN" cache_dir=/tmp/headline_search_cache)
fi
t0=$SECONDS
timeout --kill-after=20 "$LIMIT" python3 -m search run "${ARGS[@]}" "${EXTRA[@]}" > "$OUT/search.log" 2>&1
echo "search rc=$? $(( SECONDS - t0 )) s" | tee -a "$OUT/search.log"
tar czf /tmp/search_run.tgz -C /tmp/headline_search_run run && mv /tmp/search_run.tgz "$OUT/search_run.tgz"
