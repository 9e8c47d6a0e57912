"""Random COCO-shaped batches (sizes and boxes like COCO training), the same for every row."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from detector.bench.settings import Batch, BenchSettings


def make_batches(settings: BenchSettings, device: torch.device) -> list[Batch]:
    """``num_batches`` random batches: landscape images with short side ``short_side`` and long side
    uniform in [1.25 * short, max_size]; ``boxes_per_image`` +- 3 boxes, log-uniform sizes."""
    gen = torch.Generator().manual_seed(settings.seed)
    device_gen = torch.Generator(device=device).manual_seed(settings.seed)
    short, longest = settings.short_side, settings.max_size
    low_long = min(int(round(1.25 * short)), longest)
    batches = []
    for _ in range(settings.num_batches):
        images, targets = [], []
        for _ in range(settings.batch):
            width = int(torch.randint(low_long, longest + 1, (), generator=gen))
            images.append(torch.rand(3, short, width, generator=device_gen, device=device))
            targets.append({k: v.to(device) for k, v in _random_boxes(settings, short, width, gen).items()})
        batches.append(Batch(images, targets))
    return batches


def _random_boxes(settings: BenchSettings, height: int, width: int, gen: torch.Generator) -> dict[str, Tensor]:
    spread = min(3, settings.boxes_per_image - 1)
    count = int(torch.randint(settings.boxes_per_image - spread, settings.boxes_per_image + spread + 1, (),
                              generator=gen))
    smallest, largest = max(4.0, height / 50), 0.8 * height
    side = torch.exp(math.log(smallest) + torch.rand(count, generator=gen) * math.log(largest / smallest))
    aspect = torch.exp((torch.rand(count, generator=gen) * 2 - 1) * math.log(2.0)).sqrt()
    box_w = (side * aspect).clamp(2.0, width - 1.0)
    box_h = (side / aspect).clamp(2.0, height - 1.0)
    x1 = torch.rand(count, generator=gen) * (width - box_w)
    y1 = torch.rand(count, generator=gen) * (height - box_h)
    boxes = torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=1)  # (K, 4)
    labels = torch.randint(0, settings.num_classes, (count,), generator=gen)
    return {"boxes": boxes, "labels": labels}
