#!/usr/bin/env bash
# Ground truth of the proxy-fidelity study on one GPU: `python -m detector train` (the default
# synthetic experiment) of every architecture listed in experiments/search_quality/fidelity_archs.json,
# all at once -- these small models are launch-bound, so parallel runs share the GPU well --
# with each run's metrics.json and train log under $OUT/gt/<label>-s<seed>/.
#
#   carry: [".whl"]      command: bash experiments/fidelity_gpu.sh
#   then:  PYTHONPATH=. python experiments/search_quality.py fidelity --archs 12 \
#              --ground-truth <fetched>/gt --name fidelity-gpu
#
# Env: SEEDS ("0"; an entry of the list may name its own, {"label", "code", "seeds": [2]}, and
# its own train overrides, "overrides": "schedule.lr=0.02 schedule.iterations=3000", applied last), REPEAT ("nasfcos nasfcos-fpn fcos": labels trained with seed 1 as well, to
# see the seed noise), ITERS (1500), BATCH (16), LIMIT (seconds for all runs, 520), EXTRA (more
# train overrides, e.g. "train.eval_every=300" for the AP along the way in metrics.json's evals).
set -u
OUT=${OUT:-/tmp/fidelity_gpu}
SEEDS=${SEEDS:-0}
REPEAT=${REPEAT-nasfcos nasfcos-fpn fcos}   # set but empty (REPEAT=""): no repeats
ITERS=${ITERS:-1500}
BATCH=${BATCH:-16}
LIMIT=${LIMIT:-520}
read -r -a EXTRA <<< "${EXTRA:-}"
LIST=${LIST:-experiments/search_quality/fidelity_archs.json}
mkdir -p "$OUT/gt"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
export OMP_NUM_THREADS=1
CACHE=/tmp/fidelity_cache
START=$SECONDS
jobs_file=$(mktemp)
python3 - "$LIST" "$SEEDS" "$REPEAT" > "$jobs_file" <<'PY'
import json, sys
archs = json.load(open(sys.argv[1]))
seeds, repeat = sys.argv[2].split(), set(sys.argv[3].split())
for arch in archs:  # an entry's own "seeds" list replaces SEEDS for it
    own = [str(seed) for seed in arch.get("seeds", seeds)]
    for seed in sorted(set(own) | ({"1"} if arch["label"] in repeat else set())):
        print(arch["label"], seed, arch["code"], arch.get("overrides", ""))
PY
python3 - "$CACHE" "$jobs_file" <<'PY'   # the synthetic data, once per data setting, before the parallel runs
import sys
from detector.cli import compose
from detector.data.coco import resolve_data_root
# every distinct set of data.* overrides among the jobs (e.g. data.num_train=8192) gets its data here,
# so that parallel runs do not each generate the same images
settings = {()}
for line in open(sys.argv[2]):
    settings.add(tuple(sorted(word for word in line.split()[3:] if word.startswith("data."))))
for data in sorted(settings):
    cfg = compose("train", ["experiment=synthetic_fcos", f"cache_dir={sys.argv[1]}", *data])
    print("data:", " ".join(data) or "default", resolve_data_root(cfg.data, sys.argv[1]))
PY
echo "$(wc -l < "$jobs_file") runs of $ITERS iterations x batch $BATCH, limit ${LIMIT}s" | tee "$OUT/runs.log"
while read -r label seed code overrides; do
  read -r -a OWN <<< "$overrides"
  run=/tmp/fidelity_runs/$label-s$seed
  timeout --kill-after=10 "$LIMIT" python3 -m detector train "arch=$code" experiment=synthetic_fcos \
    "schedule.iterations=$ITERS" "train.batch_size=$BATCH" device=cuda "seed=$seed" "out_dir=$run" \
    "cache_dir=$CACHE" train.progress=false train.ckpt_every=100000 "${EXTRA[@]}" "${OWN[@]}" > "$OUT/gt/$label-s$seed.log" 2>&1 &
done < "$jobs_file"
wait
for log in "$OUT"/gt/*.log; do
  name=$(basename "$log" .log)
  # log.jsonl keeps val/AP of every eval, also of a run the limit cut
  [ -f "/tmp/fidelity_runs/$name/log.jsonl" ] && mkdir -p "$OUT/gt/$name" && cp "/tmp/fidelity_runs/$name/log.jsonl" "$OUT/gt/$name/"
  if [ -f "/tmp/fidelity_runs/$name/metrics.json" ]; then
    mkdir -p "$OUT/gt/$name" && cp "/tmp/fidelity_runs/$name/metrics.json" "$OUT/gt/$name/"
    echo "$name: $(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"AP {m['AP']:.4f} AP50 {m['AP50']:.4f}\")" "/tmp/fidelity_runs/$name/metrics.json")"
  else
    echo "$name: no metrics ($(tail -n 1 "$log"))"
  fi
done | tee -a "$OUT/runs.log"
echo "all runs: $(( SECONDS - START )) s" | tee -a "$OUT/runs.log"
# one archive instead of the per-run folders: a device call brings back only so many files from $OUT
# (in session 8 another script's archive beside these folders did not come back)
tar czf /tmp/gt.tgz -C "$OUT" gt runs.log && mv /tmp/gt.tgz "$OUT/gt.tgz" && rm -rf "$OUT/gt"
