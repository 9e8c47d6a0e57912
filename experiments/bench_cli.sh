# Sourced by experiments/gpu_session.sh and experiments/stress_nasfcos.sh: the bench command line in one
# place, so the stress loop runs exactly what the bench_nasfcos step runs. Needs DEVICE (cuda | cpu) and,
# optionally, BENCH_QUICK_ARGS ("bench.quick=true ..." for CPU smoke runs) in the environment.

bench() {  # bench ARCH RECIPE OVERRIDES...: the CLI when Hydra imports, else the same core from a plain dict
  local quick=()
  [ -n "${BENCH_QUICK_ARGS:-}" ] && read -r -a quick <<< "$BENCH_QUICK_ARGS"
  if python3 -c "import hydra, omegaconf" 2>/dev/null; then
    python3 -m detector bench "arch=$1" "recipe=$2" format=json "device=$DEVICE" "${quick[@]}" "${@:3}"
  else
    python3 - "$DEVICE" "$@" "${quick[@]}" <<'PY'
import json, sys, yaml
from detector.commands.bench import bench
device, arch, recipe, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = {"arch": arch, "device": device, "format": "json", "seed": 0,
       "recipe": yaml.safe_load(open(f"conf/recipe/{recipe}.yaml")),
       "bench": yaml.safe_load(open("conf/bench.yaml"))["bench"]}
for item in overrides:
    key, value = item.split("=", 1)
    cfg["bench"][key.removeprefix("bench.")] = yaml.safe_load(value)
print(json.dumps(bench(cfg)))
PY
  fi
}

nasfcos_sequence() {  # nasfcos_sequence LIMIT_S [KEY=VALUE...]: the bench_nasfcos step (issue #21's failing
  # run); a KEY=VALUE replaces the default of that key (Hydra refuses a key given twice), others are added
  local limit=$1 arg kept
  shift
  local args=("bench.deform_impl=[fast,torchvision]" "bench.time_limit=$(( limit - 50 ))"
              "bench.ablate=${NASFCOS_ABLATE:-false}" bench.cuda_graph=both bench.iters=15 bench.infer_iters=16)
  for arg in "$@"; do
    kept=()
    for default in "${args[@]}"; do
      [ "${default%%=*}" != "${arg%%=*}" ] && kept+=("$default")
    done
    args=("${kept[@]}" "$arg")
  done
  bench nasfcos nasfcos "${args[@]}"
}

export -f bench nasfcos_sequence
