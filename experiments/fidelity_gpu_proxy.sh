#!/usr/bin/env bash
# Proxy side of the fidelity study on one GPU: proxy scores (AP and val loss, mean of 2 seeds, at
# each of PROXY_ITERS iterations) of the architectures in experiments/search_quality/fidelity_archs.json,
# for each adaptation length in VARIANTS (name:adapt_iters), 8 processes at a time. Scores are
# kept in experiments/search_quality/gpu_proxy/<variant>/<label>.json; budgets already there are
# not recomputed, so a run cut by LIMIT can be continued by running again (carrying that folder).
#   carry: [".whl"]      command: bash experiments/fidelity_gpu_proxy.sh
#   then:  python experiments/search_quality.py fidelity --archs-file experiments/search_quality/fidelity_archs.json \
#            --proxy-dir experiments/search_quality/gpu_proxy/adapt150 \
#            --ground-truth experiments/search_quality/gpu_ground_truth --proxy-iters 30 120 480 --name fidelity-gpu-adapt150
# Env: VARIANTS ("adapt1500:1500 adapt150:150"), PROXY_ITERS ("30 120 480"), JOBS (8), LIMIT (270 s per variant).
set -u
OUT=${OUT:-/tmp/fidelity_gpu_proxy}
VARIANTS=${VARIANTS:-adapt1500:1500 adapt150:150}
PROXY_ITERS=${PROXY_ITERS:-30 120 480}
JOBS=${JOBS:-8}
LIMIT=${LIMIT:-270}
mkdir -p "$OUT"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
export OMP_NUM_THREADS=1
for variant in $VARIANTS; do
  name=${variant%%:*}; adapt=${variant##*:}; t0=$SECONDS
  # shellcheck disable=SC2086
  timeout "$LIMIT" python3 experiments/search_quality.py fidelity --proxy-only --device cuda --jobs "$JOBS" \
    --archs-file experiments/search_quality/fidelity_archs.json --work "/tmp/sq-$name" --out "/tmp/sqout-$name" \
    --proxy-dir "experiments/search_quality/gpu_proxy/$name" --proxy-iters $PROXY_ITERS \
    --search-extra "proxy_eval.adapt_iters=$adapt" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( SECONDS - t0 )) s"
done
tar czf /tmp/p.tgz -C experiments/search_quality gpu_proxy && mv /tmp/p.tgz "$OUT/gpu_proxy.tgz"
