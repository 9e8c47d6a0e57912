"""GPU check of the CUDA-graph training step (detector/fast/graphs/training.py): correctness, then speed.

1. Correctness: a small nasfcos (ResNet-18, width 64, 2 x 96 x 128 images, all fast paths) and the
   full-size one (ResNet-50, width 256, 2 x 800 x ~1333), eager and graphed from the same weights,
   ``--steps`` SGD steps of the graphed model, each step also computed eagerly (twice) from the
   same weights: losses, gradient norms, the relative gradient difference graphed vs eager and
   eager vs eager (the noise floor of GPU atomics), bf16 autocast + channels_last as the bench.
2. Speed: training images/s of nasfcos and of our fcos, eager and graphed, on the bench's batches
   (``detector.bench.batches.make_batches``: batch 16, 800 x 1000..1333, landscape; graphed rows pad
   every batch to 800 x 1344), all in this process; the nasfcos / fcos ratio per mode (issue #9:
   >= 0.6x) and peak memory (<= 40 GB).

Every row catches its own exception and prints it, so one failure does not lose the others.

    python experiments/check_train_graph.py                       # H100: < 5 minutes
    python experiments/check_train_graph.py --iters 30 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from detector.fast.graphs.training import install_training_graph  # noqa: E402
from detector.bench.settings import BenchSettings, Variant
from detector.bench.models import build_ours, load_recipe
from detector.bench.batches import make_batches
from detector.bench.timing import time_calls, train_graph_pad_to
from detector.arch.zoo import resolve_arch  # noqa: E402

GB = 1e9


def build(arch: str, settings: BenchSettings, graphed: bool) -> torch.nn.Module:
    """Our detector as the bench builds it (all fast paths, fast DCN), channels_last, train mode."""
    model = build_ours(resolve_arch(arch), load_recipe("nasfcos"), settings, Variant(name=arch, deform_impl="fast"),
                       torch.device("cuda"))
    model.graphs = None  # inference graphs: not used here
    model = model.to(memory_format=torch.channels_last).train()
    if graphed:
        install_training_graph(model, pad_to=train_graph_pad_to(settings))
    return model


def losses_and_grads(model, batch):
    """(losses dict, gradient norm, gradients) of one bf16 forward + backward from zeroed gradients."""
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(batch.images, batch.targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = sum(float(g.norm()) ** 2 for g in grads.values()) ** 0.5
    return {k: float(v.detach()) for k, v in losses.items()}, norm, grads


def check_correctness(name: str, arch: str, settings: BenchSettings, steps: int) -> list[dict]:
    """``steps`` SGD steps of the graphed model; before each, an eager copy with the same weights (and
    the same padding) computes the same step twice: graphed vs eager, and eager vs eager (the noise
    floor of GPU atomics)."""
    batches = make_batches(settings, torch.device("cuda"))
    eager_model = build(arch, settings, graphed=False)
    eager_model.train_graphs = _PadOnly(train_graph_pad_to(settings))  # same padded batches as the graph
    graphed_model = build(arch, settings, graphed=True)
    optimizer = torch.optim.SGD([p for p in graphed_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    rows = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        eager_model.load_state_dict(graphed_model.state_dict())
        loss_e, norm_e, grad_e = losses_and_grads(eager_model, batch)
        loss_a, _, grad_a = losses_and_grads(eager_model, batch)
        loss_g, norm_g, grad_g = losses_and_grads(graphed_model, batch)
        diff = sum(float((grad_e[n] - grad_g[n]).norm()) ** 2 for n in grad_e) ** 0.5
        noise = sum(float((grad_e[n] - grad_a[n]).norm()) ** 2 for n in grad_e) ** 0.5
        rows.append({"model": name, "step": step, "loss_eager": sum(loss_e.values()),
                     "loss_eager_again": sum(loss_a.values()), "loss_graphed": sum(loss_g.values()),
                     "grad_norm_eager": norm_e, "grad_norm_graphed": norm_g,
                     "grad_rel_diff": diff / max(norm_e, 1e-12), "grad_rel_noise": noise / max(norm_e, 1e-12),
                     "same_grad_keys": grad_e.keys() == grad_g.keys()})
        optimizer.step()
    graphs = graphed_model.train_graphs
    rows.append({"model": name, "captures": graphs.captures, "failures": sorted(set(graphs.failures.values()))})
    graphs.clear()
    del eager_model, graphed_model, optimizer
    release()
    return rows


class _PadOnly:
    """Pads like the graphed model, never captures: the eager reference for the correctness check."""

    def __init__(self, pad_to):
        from detector.fast.graphs.training import GraphedTraining

        self._graphs = GraphedTraining(pad_to=pad_to)
        self.applies = self._graphs.applies
        self.pad = self._graphs.pad

    @staticmethod
    def run(model, padded):
        features = model.forward_features(padded)
        return features, model.head(features)


def release() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def time_training(arch: str, graphed: bool, settings: BenchSettings, batches, warmup: int, iters: int) -> dict:
    model = build(arch, settings, graphed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                                weight_decay=1e-4)

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(batch.images, batch.targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    ms = statistics.median(time_calls(lambda i: step(warmup + i), torch.device("cuda"), 0, iters))  # CUDA events
    row = {"arch": arch, "mode": "graphed" if graphed else "eager", "img_per_s": settings.batch * 1000.0 / ms,
           "step_ms": ms, "peak_gb": torch.cuda.max_memory_allocated() / GB, "warmup_s": warm_s}
    if graphed:
        graphs = model.train_graphs
        row.update(captures=graphs.captures, failures=sorted(set(graphs.failures.values())))
        graphs.clear()  # its pool goes now: the next row's peak memory must not include it
    del model, optimizer
    release()
    return row


def guarded(label: str, fn, *args) -> list[dict] | dict:
    try:
        return fn(*args)
    except Exception as err:  # keep going: one failing row must not lose the others
        traceback.print_exc()
        print(f"{label}: FAILED {type(err).__name__}: {str(err).strip()[:300]}", flush=True)
        return {"label": label, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="SGD steps compared eager vs graphed")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per timing row (capture happens here)")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per timing row (median)")
    parser.add_argument("--repeats", type=int, default=1, help="timing rounds (rows interleaved per round)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--json", default=None, help="also write every row here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_train_graph: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    report: dict = {"correctness": [], "timing": []}

    if not args.skip_correctness:
        small = BenchSettings(batch=2, infer_batches=(1,), short_side=96, max_size=128, backbone="resnet18",
                              width=64, num_batches=2)
        full = BenchSettings(batch=2, infer_batches=(1,), num_batches=2)
        for name, settings in (("small nasfcos", small), ("full nasfcos", full)):
            rows = guarded(name, check_correctness, name, "nasfcos", settings, args.steps)
            rows = rows if isinstance(rows, list) else [rows]
            report["correctness"] += rows
            for row in rows:
                if "error" in row:
                    continue
                if "captures" in row:
                    print(f"{name}: {row['captures']} capture(s), failures {row['failures'] or 'none'}", flush=True)
                else:
                    print(f"{name} step {row['step']}: loss eager {row['loss_eager']:.5f} (again "
                          f"{row['loss_eager_again']:.5f}) graphed {row['loss_graphed']:.5f}; grad norm "
                          f"{row['grad_norm_eager']:.4f} / {row['grad_norm_graphed']:.4f}, rel diff graphed "
                          f"{row['grad_rel_diff']:.2e} (eager vs eager {row['grad_rel_noise']:.2e})", flush=True)

    settings = BenchSettings()
    batches = make_batches(settings, torch.device("cuda"))
    for round_ in range(args.repeats):
        for arch in ("fcos", "nasfcos"):
            for graphed in (False, True):
                label = f"{arch} {'graphed' if graphed else 'eager'} (round {round_})"
                row = guarded(label, time_training, arch, graphed, settings, batches, args.warmup, args.iters)
                row.setdefault("arch", arch)
                row.setdefault("mode", "graphed" if graphed else "eager")
                row["round"] = round_
                report["timing"].append(row)
                print(label + ": " + (row.get("error") or f"{row['img_per_s']:.1f} img/s, {row['step_ms']:.1f} ms, "
                                      f"peak {row['peak_gb']:.1f} GB, warm-up {row['warmup_s']:.1f} s"
                                      + (f", captures {row['captures']}, failures {row['failures'] or 'none'}"
                                         if graphed else "")), flush=True)

    print("\nmode     fcos img/s  nasfcos img/s  nasfcos/fcos  nasfcos peak GB   (median over rounds)")
    for mode in ("eager", "graphed"):
        def best(arch, key):
            values = [r[key] for r in report["timing"] if r["arch"] == arch and r["mode"] == mode and key in r]
            return statistics.median(values) if values else None
        fcos, nas, peak = best("fcos", "img_per_s"), best("nasfcos", "img_per_s"), best("nasfcos", "peak_gb")
        ratio = f"{nas / fcos:.3f}x" if fcos and nas else "-"
        print(f"{mode:<8} {fcos or float('nan'):>10.1f} {nas or float('nan'):>14.1f} {ratio:>13} "
              f"{peak or float('nan'):>16.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
