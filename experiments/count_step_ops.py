"""How many operators one end-to-end proxy training step launches, by phase (CPU, no GPU needed).

On the GPU a proxy trial is bound by its host thread (~100 ms per iteration whatever the number of
trials sharing the GPU; README, "Search throughput"), i.e. by the operators it launches one by one.
This counts the top-level ``aten::`` operators of one training step of the end-to-end proxy (the
search's default task, batch 16, width 64), split into the phases the CUDA-graph training step
(``proxy_eval.cuda_graph``) replays from a graph -- the network's forward and, inside the backward,
its gradients -- and those that stay eager (targets and losses, the optimizer). It predicts how much
host work the graph removes; the GPU bench measures what that is worth.

    python experiments/count_step_ops.py --arch fcos nasfcos <code>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def top_level_ops(prof) -> int:
    """``aten::`` events whose parent is not an ``aten::`` op (each a dispatch from Python or autograd)."""
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def count_phases(model, images, targets, optimizer) -> dict[str, int]:
    """Top-level operators of each phase of one training step (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from detector.engine.step import forward_losses

    device = torch.device("cpu")
    with profile(activities=[ProfilerActivity.CPU]) as network:
        padded, _ = model.preprocess(images)
        model.head(model.forward_features(padded))
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        loss = sum(forward_losses(model, images, targets, device, None).values())
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        loss.backward()
    with profile(activities=[ProfilerActivity.CPU]) as step:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"network_forward": top_level_ops(network), "forward": top_level_ops(forward),
           "backward": top_level_ops(backward), "optimizer": top_level_ops(step)}
    out["targets_and_losses"] = max(0, out["forward"] - out["network_forward"])
    out["total"] = out["forward"] + out["backward"] + out["optimizer"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["fcos", "nasfcos"], help="zoo names or codes")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("overrides", nargs="*", help="more search config overrides (after --)")
    args = parser.parse_args(argv)

    import torch

    from detector.arch.zoo import resolve_arch
    from detector.cli import compose
    from detector.data.stream import batch_to_device, build_train_stream
    from detector.engine.optim import parameter_groups
    from detector.engine.step import forward_losses, optimizer_step
    from proxy_eval.build import build_evaluator, prepare_proxy
    from proxy_eval.end_to_end import _short_schedule

    torch.set_num_threads(1)
    cache = [f"cache_dir={args.cache_dir}"] if args.cache_dir else []
    cfg = compose("search", ["proxy_eval=end_to_end", "device=cpu", *cache, *args.overrides])
    evaluator = build_evaluator(cfg, cache=prepare_proxy(cfg))
    stream = iter(build_train_stream(evaluator._loaded()["train"], evaluator.settings.batch_size, 0, 0, 1, 0, 0,
                                     pin_memory=False))
    device = torch.device("cpu")
    print("| architecture | network forward | targets + losses | backward | optimizer (foreach) | total | "
          "network forward share |")
    print("|---|---|---|---|---|---|---|")
    for name in args.arch:
        model = evaluator._build(resolve_arch(name, num_blocks=None, num_head_layers=None), 0, device).train()
        schedule = _short_schedule(evaluator.settings)
        # foreach=True: the multi-tensor update a CUDA run picks by default (a few ops, not a few per parameter)
        optimizer = torch.optim.SGD(parameter_groups(model, schedule), lr=schedule.lr,
                                    momentum=schedule.momentum, foreach=True)
        params = [p for p in model.parameters() if p.requires_grad]
        images, targets = batch_to_device(*next(stream), device)
        optimizer_step(sum(forward_losses(model, images, targets, device, None).values()), optimizer, params, 0.0)
        ops = count_phases(model, images, targets, optimizer)
        label = name if len(name) < 24 else name[:21] + "..."
        print(f"| {label} | {ops['network_forward']} | {ops['targets_and_losses']} | {ops['backward']} | "
              f"{ops['optimizer']} | {ops['total']} | {ops['network_forward'] / ops['total']:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
