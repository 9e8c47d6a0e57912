"""Seconds per training iteration of the default experiment vs the former one, interleaved.

On a shared machine absolute timings drift with the load; alternating the two configurations
(one iteration each, same images) makes their ratio fair. Prints the median seconds per iteration
of each and the ratio new / old. Usage (one thread):
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/time_default_step.py [iterations]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from detector.model.build import build_detector_from_cfg
from detector.cli import compose
from detector.engine.optim import Schedule, build_optimizer
from detector.arch.zoo import resolve_arch


def random_batch(generator: torch.Generator, n: int, min_side: int, max_side: int):
    """n images of 64-128 px (as the synthetic default) with 1-4 boxes of >= 16 px each."""
    images, targets = [], []
    for _ in range(n):
        h, w = (int(torch.randint(min_side, max_side + 1, (1,), generator=generator)) for _ in range(2))
        images.append(torch.rand(3, h, w, generator=generator))
        k = int(torch.randint(1, 5, (1,), generator=generator))
        x0 = torch.rand(k, generator=generator) * (w - 20)
        y0 = torch.rand(k, generator=generator) * (h - 20)
        size = 16 + torch.rand(k, generator=generator) * 16
        boxes = torch.stack([x0, y0, (x0 + size).clamp(max=w), (y0 + size).clamp(max=h)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 6, (k,), generator=generator)})
    return images, targets


def main(iterations: int = 20) -> None:
    torch.set_num_threads(1)
    setups = {"new default (synthetic_fcos)": [], "old default (synthetic_fcos_scratch)": ["experiment=synthetic_fcos_scratch"]}
    models, optimizers, times = {}, {}, {name: [] for name in setups}
    for name, overrides in setups.items():
        cfg = compose("train", overrides)
        torch.manual_seed(0)
        models[name] = build_detector_from_cfg(cfg, resolve_arch(str(cfg.arch))).train()
        optimizers[name] = build_optimizer(models[name], Schedule.from_cfg(cfg.schedule))
        batch_size, min_side, max_side = cfg.train.batch_size, cfg.data.image_min_side, cfg.data.image_max_side
    generator = torch.Generator().manual_seed(0)
    for iteration in range(iterations + 2):  # 2 warm-up iterations
        images, targets = random_batch(generator, batch_size, min_side, max_side)
        for name, model in models.items():
            start = time.perf_counter()
            losses = model(images, targets)
            optimizers[name].zero_grad()
            sum(losses.values()).backward()
            optimizers[name].step()
            if iteration >= 2:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name}: {median:.3f} s/iteration (median of {iterations}), {batch_size / median:.1f} images/s")
    new, old = medians.values()
    print(f"ratio new / old: {new / old:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
