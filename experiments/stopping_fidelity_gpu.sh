#!/usr/bin/env bash
# Issue #23's fidelity of early stopping on one GPU, two jobs sharing it under CUDA MPS:
# 1. the headline search of issue #20 (PPO, two stages of 24 trials, end-to-end proxy, 10 trials at
#    once, seed 0) again, now with search.scheduler=asha, first rung at 100 of 300 iterations (the
#    default when it ran, session 10; the default is now 150, following this script's second job),
#    so that its best code can be retrained against the best of the same search without a scheduler
#    (experiments/search_quality/pretrained/headline.md); its run comes back as $OUT/search/search_run.tgz;
# 2. the end-to-end proxy (300 iterations, seeds 0 1 2) on the 16 architectures whose trained AP is
#    known (experiments/search_quality/pretrained/archs.json, gpu_ground_truth/), keeping every seed's
#    learning curve, for experiments/replay_early_stopping.py --fidelity-dir; $OUT/curves/e2e-curves.tgz.
#   carry: [".whl"]  (with Ray: experiments/gpu_env.sh)     command: bash experiments/stopping_fidelity_gpu.sh
# Env: LIMIT (seconds for each job, 480).
set -u
OUT=${OUT:-/tmp/stopping_fidelity}
LIMIT=${LIMIT:-480}
mkdir -p "$OUT/search" "$OUT/curves"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"   # once, before the two jobs (they would race to install)
# shellcheck source=experiments/gpu_mps.sh
source experiments/gpu_mps.sh "$OUT/mps.txt"
OUT=$OUT/search MPS=1 LIMIT=$LIMIT EXTRA="search.scheduler=asha search.stopping.grace_period=100" bash experiments/headline_search_gpu.sh &
OUT=$OUT/curves MPS=1 LIMIT=$LIMIT REGIME=pretrained NAME=curves PROXY_ITERS=300 PROXY_SEEDS="0 1 2" JOBS=6 \
  bash experiments/fidelity_gpu_end_to_end.sh &
wait
