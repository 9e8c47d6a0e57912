#!/usr/bin/env bash
# Issue #21: run the bench_nasfcos sequence of experiments/gpu_session.sh (nasfcos_sequence in
# experiments/bench_cli.sh: same arguments) RUNS times, each in a fresh process, and count failures.
#
# One run fails when the process exits non-zero (a crash, a timeout), prints no result, or its result
# has a row error (other than "skipped: past bench.time_limit") or a failed self-check: an illegal
# address inside a row is caught as that row's error and breaks every later row.
# N: a fault that hits one run in four passes RUNS runs unseen with probability 0.75^RUNS, which is
# <= 0.01 from RUNS = 17 on (0.75^16 = 0.0100, 0.75^17 = 0.0075).
#
# Environment (all optional):
#   RUNS=17           runs wanted in all (counting STRESS_PREVIOUS's)
#   RUN_LIMIT=200     seconds per run (the bench_nasfcos step's limit)
#   STRESS_BUDGET=540 seconds; no run starts once they are spent (a device command may take 600 s)
#   STRESS_MODE=exact exact: the step's arguments; short: the same rows, shapes, captures and
#                     self-check with fewer timed iterations (bench.warmup=3 iters=3 infer_iters=4)
#   BISECT="k=v ..."  overrides replacing or adding bench settings, e.g. "bench.deform_impl=[fast]
#                     bench.cuda_graph=true" or "bench.fast_paths=[frozen_bn,group_norm,losses,points]"
#   RUN_ENV="V=x ..." environment of each run, e.g. "CUDA_LAUNCH_BLOCKING=1" or
#                     "CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0" (no cuBLAS workspace)
#   STRESS_OUT        output folder (default $OUT/stress, OUT default /tmp/stress_out)
#   STRESS_PREVIOUS   a runs.tsv of earlier slices (other device calls) to continue: copied first
#   STOP_ON_FAIL=1    stop at the first failing run (reproduce "until it fails"; bisection)
# Outputs: $STRESS_OUT/runs.tsv (one line per run), fail_<run>.err (stderr tail of each failing
# run), summary.txt ("failures F / runs R ..."). Standalone (carry .whl):
#   bash experiments/stress_nasfcos.sh        or, in a GPU session: STEPS=stress bash experiments/gpu_session.sh
set -u
RUNS=${RUNS:-17}
RUN_LIMIT=${RUN_LIMIT:-200}
STRESS_BUDGET=${STRESS_BUDGET:-540}
STRESS_MODE=${STRESS_MODE:-exact}
BISECT=${BISECT:-}
RUN_ENV=${RUN_ENV:-}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/stress_out}
STRESS_OUT=${STRESS_OUT:-$OUT/stress}
mkdir -p "$STRESS_OUT"
TSV="$STRESS_OUT/runs.tsv"
export DEVICE

if [ -z "${PYTHONPATH:-}" ] || ! python3 -c "import detector" 2>/dev/null; then
  # shellcheck source=experiments/gpu_env.sh
  source experiments/gpu_env.sh "$STRESS_OUT/pip.log"
fi
# shellcheck source=experiments/bench_cli.sh
source experiments/bench_cli.sh

case "$STRESS_MODE" in
  exact) MODE_ARGS=() ;;
  short) MODE_ARGS=(bench.warmup=3 bench.iters=3 bench.infer_iters=4) ;;
  *) echo "stress_nasfcos.sh: STRESS_MODE=$STRESS_MODE: use exact or short" >&2; exit 2 ;;
esac
read -r -a BISECT_ARGS <<< "$BISECT"
read -r -a ENV_ARGS <<< "$RUN_ENV"

if [ ! -s "$TSV" ]; then
  if [ -n "${STRESS_PREVIOUS:-}" ] && [ -s "$STRESS_PREVIOUS" ]; then
    cp "$STRESS_PREVIOUS" "$TSV"
  else
    printf 'run\trc\tverdict\tseconds\tmode\tbisect\trun_env\tlast_progress\tfirst_error\n' > "$TSV"
  fi
fi

classify() {  # classify RC STDOUT_FILE STDERR_FILE -> "verdict<TAB>first error" (verdict ok | FAIL)
  python3 - "$@" <<'PY'
import json, sys
rc, out, err = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def first_error_line():
    lines = open(err, errors="replace").read().splitlines()
    hits = [l for l in lines if "illegal" in l or "CUDA error" in l or "Error" in l]
    return (hits[0] if hits else (lines[-1] if lines else "")).strip()[:200]
problems = []
try:
    result = json.loads(open(out).read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    result = None
if rc != 0:
    problems.append(f"rc={rc}: {first_error_line()}")
if result is None:
    problems.append("no JSON result")
else:
    for row in result.get("rows", []):
        error = row.get("error", "")
        if error and not error.startswith("skipped:"):
            problems.append(f"row '{row['name']}': {error[:160]}")
    check = result.get("self_check") or {}
    if check and not check.get("ok"):
        problems.append(f"self-check: {str(check.get('error', 'MISMATCH'))[:160]}")
print(("FAIL" if problems else "ok") + "\t" + " | ".join(problems).replace("\t", " ")[:400])
PY
}

count_runs() { tail -n +2 "$TSV" | wc -l; }
START=$SECONDS
while (( $(count_runs) < RUNS )); do
  if (( SECONDS - START + 30 > STRESS_BUDGET )); then
    echo "stress: budget of ${STRESS_BUDGET}s spent after $(count_runs) runs" >&2
    break
  fi
  run=$(( $(count_runs) + 1 ))
  limit=$RUN_LIMIT
  left=$(( STRESS_BUDGET - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  t0=$SECONDS
  env "${ENV_ARGS[@]}" timeout --kill-after=10 "$limit" bash -c 'nasfcos_sequence "$@"' stress "$RUN_LIMIT" \
    "${MODE_ARGS[@]}" "${BISECT_ARGS[@]}" > "$STRESS_OUT/run.out" 2> "$STRESS_OUT/run.err"
  rc=$?
  seconds=$(( SECONDS - t0 ))
  IFS=$'\t' read -r verdict first_error < <(classify "$rc" "$STRESS_OUT/run.out" "$STRESS_OUT/run.err")
  if (( rc == 124 || rc == 137 )) && (( limit < RUN_LIMIT )); then
    echo "stress: run $run cut by the budget after ${seconds}s: not counted" >&2
    break
  fi
  progress=$(grep '^\[bench ' "$STRESS_OUT/run.err" | tail -n 1 | tr '\t' ' ')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$rc" "$verdict" "$seconds" "$STRESS_MODE" "$BISECT" \
    "$RUN_ENV" "$progress" "$first_error" >> "$TSV"
  echo "stress run $run: $verdict (rc=$rc, ${seconds}s) ${first_error}" >&2
  if [ "$verdict" = FAIL ]; then
    tail -n 60 "$STRESS_OUT/run.err" > "$STRESS_OUT/fail_$run.err"
    [ -n "${STOP_ON_FAIL:-}" ] && break
  fi
done
rm -f "$STRESS_OUT/run.out" "$STRESS_OUT/run.err"
python3 - "$TSV" "$RUNS" > "$STRESS_OUT/summary.txt" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
wanted = int(sys.argv[2])
failures = sum(r["verdict"] == "FAIL" for r in rows)
modes = sorted({(r["mode"], r["bisect"], r["run_env"]) for r in rows})
print(f"failures {failures} / runs {len(rows)} (wanted {wanted}; {'complete' if len(rows) >= wanted else 'INCOMPLETE'}) "
      f"modes {modes}")
PY
cat "$STRESS_OUT/summary.txt"
