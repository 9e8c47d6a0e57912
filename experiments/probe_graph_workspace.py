"""Issue #21 suspect: a CUDA graph replaying with a cuBLAS workspace it does not own.

cuBLAS gets one workspace per (handle, stream) from PyTorch, allocated at first use and reused by
every later GEMM on that stream -- by a capture too, which bakes the address into its graph. All
``torch.cuda.graph`` captures share one capture stream, and destroying any graph captured on a
stream frees that stream's workspaces (``CUDAGraph`` reset). If the workspace was allocated by an
earlier graph's capture (in that graph's private pool) or by eager code on the same stream, a later
graph replays with memory that ``empty_cache`` (which every capture calls) can hand back to the
driver: silent corruption, or an illegal address.

Each probe runs in its own process (an illegal address poisons the CUDA context) and prints one line:

- ``two_graphs``: capture A, capture B (same capture stream, separate pools), destroy A,
  ``empty_cache``, overwrite memory, replay B, compare with eager;
- ``train_then_infer``: the project's two graph kinds on one small detector -- a graphed training
  step, a graphed inference call, an optimizer step (which invalidates the inference graphs), another
  inference call (a new capture, whose ``empty_cache`` releases freed pools), then graphed training
  steps again, losses compared with an eager copy.

    python experiments/probe_graph_workspace.py            # all probes; exit 1 if any reproduces
    python experiments/probe_graph_workspace.py two_graphs
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TWO_GRAPHS = r"""
import torch
torch.manual_seed(0)
a = torch.randn(256, 1 << 16, device="cuda")
b = torch.randn(1 << 16, 256, device="cuda")  # long K: cuBLAS picks split-K kernels that use the workspace
want = a @ b
def capture():
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        a @ b  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = a @ b
    return g, out
graph_a, _ = capture()
graph_b, out_b = capture()
del graph_a
torch.cuda.synchronize()
torch.cuda.empty_cache()
junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(256)]
graph_b.replay()
torch.cuda.synchronize()
error = float((out_b - want).abs().max() / want.abs().max())
print(f"two_graphs: replay after the other graph's destruction, max rel error {error:.2e}:",
      "REPRODUCED (wrong values)" if not error < 1e-3 else "not reproduced")
"""

TRAIN_THEN_INFER = r"""
import torch
from detector.model.build import build_detector
from detector.fast.switch import set_fast_paths
from detector.fast.graphs.training import install_training_graph
from detector.bench.throughput import load_recipe
from detector.arch.zoo import resolve_arch

def detector():
    torch.manual_seed(0)
    model = build_detector(resolve_arch("nasfcos"), 5, load_recipe("nasfcos"), "resnet18", width=64, frozen_stages=1)
    return set_fast_paths(model, "all").cuda().to(memory_format=torch.channels_last)

gen = torch.Generator().manual_seed(1)
images = [torch.rand(3, 160, 224, generator=gen).cuda() for _ in range(2)]
targets = [{"boxes": torch.tensor([[10.0, 10.0, 90.0, 80.0]], device="cuda"), "labels": torch.tensor([1], device="cuda")}] * 2
graphed, eager = detector(), detector()
graphs = install_training_graph(graphed)
opt_g = torch.optim.SGD([p for p in graphed.parameters() if p.requires_grad], lr=1e-3)
opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=1e-3)
def train_step(model, opt):
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(model(images, targets).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)
def infer(model):
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(images[:1])
worst = 0.0
for step in range(4):
    losses = (train_step(graphed, opt_g), train_step(eager, opt_e))
    worst = max(worst, abs(losses[0] - losses[1]) / abs(losses[1]))
    infer(graphed)  # after an optimizer step: the inference graphs are dropped, a new one is captured
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    del junk
torch.cuda.synchronize()
print(f"train_then_infer: {graphs.captures} training capture(s), failures {graphs.failures or 'none'}, "
      f"worst loss rel diff graphed vs eager {worst:.2e}:", "REPRODUCED (diverged)" if not worst < 5e-2 else "not reproduced")
"""

PROBES = {"two_graphs": TWO_GRAPHS, "train_then_infer": TRAIN_THEN_INFER}


def run(name: str) -> bool:
    """Run one probe in a subprocess; True when it reproduced (wrong values or a CUDA error)."""
    result = subprocess.run([sys.executable, "-c", PROBES[name]], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0:
        error = [l for l in result.stderr.splitlines() if "error" in l.lower()]
        line = f"{name}: REPRODUCED (rc={result.returncode}): {(error or ['?'])[-1][:200]}"
    print(line, flush=True)
    return "REPRODUCED" in line


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("probe_graph_workspace.py needs a CUDA GPU", file=sys.stderr)
        return 2
    names = argv or list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        print(f"probe_graph_workspace.py: unknown probe {unknown}; choose among {', '.join(PROBES)}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    reproduced = [run(name) for name in names]
    return 1 if any(reproduced) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
