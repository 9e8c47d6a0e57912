#!/usr/bin/env bash
# Issue #21: compute-sanitizer over the nasfcos bench at reduced shapes, one (tool, config) per run.
#
#   bash experiments/sanitize_nasfcos.sh [TOOL:CONFIG[:KERNELS] ...]
#
# Default runs: memcheck:fast_eager memcheck:fast_graph memcheck:tv_graph initcheck:fast_eager
# racecheck:fast_eager:_sample_columns racecheck:fast_eager:_cat_ (KERNELS: a kernel-name substring
# the tool is limited to; racecheck is slow). Configs (each: batch 2, 160 x <= 224 images, ResNet-18, width 256, every
# row phase once -- inference b1/b2, training, no torchvision reference, no self-check):
#   fast_eager  fast DCN, eager training, inference graphs off, PYTORCH_NO_CUDA_MEMORY_CACHING=1:
#               every tensor is its own cudaMalloc, so memcheck sees an access one element past a
#               tensor and any use after free (with the caching allocator it sees neither)
#   fast_graph  fast DCN, CUDA-graph training step and graphed inference; caching allocator on (the
#               graphs need it): memcheck then reports accesses outside every live segment -- which is
#               what an illegal address is
#   tv_graph    torchvision's DCN, same as fast_graph
#   fast_both   fast DCN, eager and graphed rows in one process (the order of the failing sequence)
# Tools: memcheck (out of bounds, misaligned, freed), initcheck (reads of never-written device memory;
# expect some noise from library kernels), racecheck (shared-memory hazards inside kernels, e.g. in
# the layout conversions of the cat kernels' reshape / join / split), synccheck.
# Environment: SAN_LIMIT (seconds per run, default 540: one run per device command of 600 s),
# SANITIZER (default compute-sanitizer, else /usr/local/cuda/bin/compute-sanitizer), OUT.
# Outputs: $OUT/sanitize/<tool>_<config>[_<kernels>].log
# and summary.txt (one line per run: tool, config, rc, the sanitizer's ERROR SUMMARY line).
set -u
OUT=${OUT:-/tmp/sanitize_out}
SAN_LIMIT=${SAN_LIMIT:-540}
DIR="$OUT/sanitize"
mkdir -p "$DIR"
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$SANITIZER" ]; then
  echo "sanitize_nasfcos.sh: compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
# shellcheck source=experiments/gpu_env.sh
source experiments/gpu_env.sh "$DIR/pip.log"
export DEVICE=${DEVICE:-cuda}  # cpu: a smoke run of the plumbing (with a stand-in SANITIZER)
# shellcheck source=experiments/bench_cli.sh
source experiments/bench_cli.sh

SMALL=(bench.batch=2 "bench.infer_batches=[1,2]" bench.short_side=160 bench.max_size=224 bench.num_batches=2
       bench.warmup=1 bench.iters=1 bench.infer_warmup=1 bench.infer_iters=1 bench.torchvision=none
       bench.self_check=false bench.backbone=resnet18 bench.time_limit=0)
NO_GRAPHS="bench.fast_paths=[frozen_bn,group_norm,losses,points,postprocess,resize,cat_reduce]"

run_one() {  # run_one TOOL CONFIG [KERNELS]
  local tool=$1 config=$2 kernels=${3:-} env=() args=() flags=(--tool "$1" --error-exitcode 9 --print-limit 30)
  case "$config" in
    fast_eager) env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); args=("bench.deform_impl=[fast]" bench.cuda_graph=false "$NO_GRAPHS") ;;
    fast_graph) args=("bench.deform_impl=[fast]" bench.cuda_graph=true) ;;
    tv_graph) args=("bench.deform_impl=[torchvision]" bench.cuda_graph=true) ;;
    fast_both) args=("bench.deform_impl=[fast]" bench.cuda_graph=both) ;;
    *) echo "unknown config $config (fast_eager fast_graph tv_graph fast_both)" >&2; return 2 ;;
  esac
  [ -n "$kernels" ] && flags+=(--kernel-name "kns=$kernels")
  [ "$tool" = initcheck ] && flags+=(--track-unused-memory no)
  local log="$DIR/${tool}_${config}${kernels:+_$kernels}.log" t0=$SECONDS
  echo "=== $tool $config (limit ${SAN_LIMIT}s) ===" >&2
  env "${env[@]}" timeout --kill-after=10 "$SAN_LIMIT" "$SANITIZER" "${flags[@]}" \
    bash -c 'bench nasfcos nasfcos "$@"' sanitize "${SMALL[@]}" "${args[@]}" > "$log" 2>&1
  local rc=$?
  local summary
  summary=$(grep -h "ERROR SUMMARY" "$log" | tail -n 1)
  printf '%s\t%s\trc=%s\t%ss\t%s\n' "$tool" "$config${kernels:+ ($kernels)}" "$rc" "$(( SECONDS - t0 ))" "${summary:-no ERROR SUMMARY (timed out or crashed)}" \
    | tee -a "$DIR/summary.txt"
}

RUNS=("$@")
(( ${#RUNS[@]} )) || RUNS=(memcheck:fast_eager memcheck:fast_graph memcheck:tv_graph initcheck:fast_eager
                            racecheck:fast_eager:_sample_columns racecheck:fast_eager:_cat_)
for item in "${RUNS[@]}"; do
  IFS=: read -r tool config kernels <<< "$item"
  run_one "$tool" "$config" "$kernels"
done
