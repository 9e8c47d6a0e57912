#!/usr/bin/env bash
# Issue #23's figure on one GPU: candidates per GPU-hour of the default GPU search (end-to-end proxy,
# Ray) -- the issue's baseline (4 trials per GPU, no MPS), then, in the same call, MPS with 16 trials
# per GPU and the CUDA-graph training step (proxy_eval.cuda_graph=true), then the same with the median
# stopping rule (its default grace period: 200 of 300 iterations) -- through
# experiments/bench_search_throughput.py. Session 14 measured the target this way on one H100 (README,
# "Search throughput"): 32 candidates per setting, the baseline ~330-360 s there, each MPS row 73-88 s,
# so on such a host the warm-up and the three rows just exceed LIMIT and the last row is cut (session
# 14 measured it in a second call on the same warm machine, with the baseline again).
# Keep the settings without MPS first: turning MPS off after an MPS run waits for every process that
# used the GPU under it (session 14's first call lost its baseline there; the bench now kills what
# nvidia-smi lists, names what is left, and skips every later setting if the switch fails).
# Results: $OUT/bench.log (the table), $OUT/bench.json (rewritten after every setting, so a cut call
# keeps what is done) and $OUT/histories.tgz (each run's history.jsonl, also of a setting cut by LIMIT
# or by the device's limit: snapshotted every 10 s, its rate so far). Then, here:
#   python experiments/plot_throughput.py bench.json --baseline off:4:none --out throughput.png
#   carry: [".whl"]  (with Ray: experiments/gpu_env.sh says how Ray travels)
#   command: bash experiments/throughput_gpu.sh
# Env: SETTINGS ("off:4:none on:16:none:proxy_eval.cuda_graph=true on:16:median:proxy_eval.cuda_graph=true"),
#      BUDGET (candidates per setting, 32), LIMIT (seconds, 560: with the install the call stays under
#      600 s), EXTRA (more search overrides), GRAPH_TEST (0; 1 runs the GPU test of proxy_eval.cuda_graph
#      first, ~30 s), WARMUP (1: an untimed one-candidate search of 20 iterations before the timed ones,
#      ~50 s; 0 skips it, and the first setting then pays Triton's kernel compilation).
set -u
OUT=${OUT:-/tmp/throughput_gpu}
SETTINGS=${SETTINGS:-off:4:none on:16:none:proxy_eval.cuda_graph=true on:16:median:proxy_eval.cuda_graph=true}
BUDGET=${BUDGET:-32}
LIMIT=${LIMIT:-560}
GRAPH_TEST=${GRAPH_TEST:-0}
WARMUP=${WARMUP:-1}
# the untimed one-candidate search first: it fills Triton's kernel cache (~/.triton/cache, shared by
# the trial processes), which the first timed setting would otherwise pay alone (session 10's baseline did)
WARMUP_FLAG=$([ "$WARMUP" = 0 ] && echo --no-warmup || echo --warmup-iters 20)
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
export OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
# first, the GPU test of the CUDA-graph trial (one capture, same loss as eager): $OUT/graph_test.log
if [ "$GRAPH_TEST" != 0 ]; then
  timeout 120 python3 -m pytest -q -m gpu tests/proxy_eval/test_end_to_end_proxy.py -k cuda_graph -p no:cacheprovider \
    > "$OUT/graph_test.log" 2>&1; echo "graph test rc=$?" | tee -a "$OUT/graph_test.log"
fi
# every run's history (a setting cut by LIMIT keeps the trials it finished: its rate so far), written
# whole before it replaces the last snapshot
snapshot_histories() {
  tar czf "$OUT/.histories.tgz" /tmp/bench-search-*/*/history.jsonl 2>/dev/null && mv "$OUT/.histories.tgz" "$OUT/histories.tgz"
}
# every 10 s while the bench runs: a call cut by the device's own limit (which gives the last snapshot
# below no chance) keeps the trials finished so far
(while sleep 10; do snapshot_histories; done) &
SNAPSHOTS=$!
# shellcheck disable=SC2086
timeout --kill-after=20 "$LIMIT" python3 experiments/bench_search_throughput.py --device cuda --executor ray \
  --budget "$BUDGET" $WARMUP_FLAG --settings $SETTINGS --json "$OUT/bench.json" \
  -- proxy_eval=end_to_end model.width=64 cache_dir=/tmp/throughput_cache "${EXTRA[@]}" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
kill "$SNAPSHOTS" 2>/dev/null; wait "$SNAPSHOTS" 2>/dev/null
snapshot_histories
rm -f "$OUT/.histories.tgz"
grep '^|' "$OUT/bench.log"
