"""Layer-level timings behind the nasfcos speed changes: reference vs fast, forward + backward.

Shapes are those of a nasfcos training step in the bench (batch 16, 800 x 1216 images: P3 100x152,
P4 50x76, P5 25x38), bf16 autocast, channels_last, on one GPU:

- ``resize``: ``F.interpolate(bilinear)`` vs :func:`detector.fast.fpn.resize_gemm` (P5 -> P3,
  P4 -> P3, P3 -> P4);
- ``cat reduce``: the ``cat`` aggregation's grouped 1x1 conv vs :class:`FastConcatReduce` at P3;
- ``dcn predictor``: the 3x3 conv predicting offsets and masks with 54 vs 56 output channels at P3.

    python experiments/bench_fpn_ops.py            # CUDA; --quick for a CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detector.fast.fpn import FastConcatReduce, resize_gemm  # noqa: E402
from detector.model.ops import build_aggregation  # noqa: E402


def timed(step, device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of step() after warm-up."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def forward_backward(fn, *shapes, device, channels: int, batch: int):
    inputs = [torch.randn(batch, channels, h, w, device=device).to(memory_format=torch.channels_last)
              .requires_grad_() for h, w in shapes]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch, channels, scale = (2, 16, 8) if args.quick else (16, 256, 1)
    p3, p4, p5 = ((100 // scale, 152 // scale), (50 // scale, 76 // scale), (25 // scale, 38 // scale))
    rows = []
    for name, src, dst in (("resize P5->P3", p5, p3), ("resize P4->P3", p4, p3), ("resize P3->P4", p3, p4)):
        ref = timed(forward_backward(lambda x: F.interpolate(x, size=dst, mode="bilinear", align_corners=False),
                                     src, device=device, channels=channels, batch=batch), device)
        fast = timed(forward_backward(lambda x: resize_gemm(x, dst), src, device=device, channels=channels,
                                      batch=batch), device)
        rows.append((name, ref, fast))
    reference = build_aggregation("cat", channels).to(device).to(memory_format=torch.channels_last)
    fast_cat = build_aggregation("cat", channels).to(device).to(memory_format=torch.channels_last)
    fast_cat.__class__ = FastConcatReduce
    rows.append(("cat reduce P3",
                 timed(forward_backward(reference, p3, p3, device=device, channels=channels, batch=batch), device),
                 timed(forward_backward(fast_cat, p3, p3, device=device, channels=channels, batch=batch), device)))
    predictor = {}
    for out_channels in (54, 56):
        conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1).to(device).to(memory_format=torch.channels_last)
        predictor[out_channels] = timed(forward_backward(conv, p3, device=device, channels=channels, batch=batch),
                                        device)
    rows.append(("dcn predictor P3 (54 vs 56 ch)", predictor[54], predictor[56]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"forward+backward ms, median of 20 after 3 warm-up; batch {batch}, {channels} channels, "
          f"bf16 autocast + channels_last on {name}, torch {torch.__version__}")
    print(f"{'layer':<32} {'reference':>10} {'fast':>10} {'speed-up':>9}")
    for label, ref, fast in rows:
        print(f"{label:<32} {ref:>10.3f} {fast:>10.3f} {ref / fast:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
