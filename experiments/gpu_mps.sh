# Sourced by the experiments/*.sh scripts run on the GPU machine when MPS=1: starts the CUDA
# Multi-Process Service, so that the kernels of many small parallel runs overlap instead of
# time-slicing the GPU (session 7: 32 trainings at once finished in 448 s on an H200; without MPS,
# 15 took 360 s on an H100). It uses the default pipe directory, so every later CUDA process of the
# machine joins it, other scripts' too; a daemon left by an earlier call of the same machine is kept.
# Sets MPS_ON=1 when it runs (and a CUDA context opens through it), else 0 (and stops a half-started one).
# Usage: source experiments/gpu_mps.sh <file that gets the one-line outcome>
MPS_ON=0
if { pgrep -f nvidia-cuda-mps-control > /dev/null || nvidia-cuda-mps-control -d; } \
    && python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
  MPS_ON=1
  echo "MPS on" | tee "$1"
else
  echo "MPS did not start" | tee "$1"
  echo quit | nvidia-cuda-mps-control 2>/dev/null
fi
