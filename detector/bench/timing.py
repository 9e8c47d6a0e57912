"""Timing: warm-up, per-iteration CUDA events (host clock on CPU), medians; training and inference
measurements of one model; host syncs per step; the environment of a run."""
from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor, nn

from detector.bench.settings import GB, Batch, BenchSettings


def train_graph_pad_to(settings: BenchSettings) -> tuple[int, int]:
    """The one padded shape of the bench's training batches (landscape, padded to 32): the graphed
    rows pad every batch to it, so one graph serves them all."""
    return math.ceil(settings.short_side / 32) * 32, math.ceil(settings.max_size / 32) * 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[int], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls ``step(i)`` after ``warmup`` calls (events on CUDA)."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    if device.type != "cuda":
        times = []
        for i in range(iters):
            start = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - start) * 1000.0)
        return times
    events = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(warmup + i)
        end.record()
        events.append((start, end))
    synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many synchronizing CUDA calls ``fn`` makes (torch.cuda's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _autocast(settings: BenchSettings, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")


def measure_training(model: nn.Module, batches: list[Batch], settings: BenchSettings,
                     device: torch.device) -> dict[str, float]:
    """Train-step throughput and peak memory of ``model`` (train mode, SGD momentum 0.9)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=1e-4)
    last: dict[str, Tensor] = {}

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with _autocast(settings, device):
            losses = model(batch.images, batch.targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last["loss"] = loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(step, device, settings.warmup, settings.iters)
    median = statistics.median(times)
    result = {
        "train_images_per_s": settings.batch * 1000.0 / median,
        "train_step_ms": median,
        "train_step_ms_spread": max(times) - min(times),
        "final_loss": float(last["loss"]),
    }
    if device.type == "cuda":
        result["train_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["train_syncs_per_step"] = count_syncs(lambda: step(0), device)
    optimizer.zero_grad(set_to_none=True)
    return result


def measure_inference(model: nn.Module, batches: list[Batch], settings: BenchSettings, batch_size: int,
                      device: torch.device) -> dict[str, float]:
    """Eval-mode throughput (forward + post-processing) at ``batch_size`` images per call."""
    model.eval()
    if batch_size == 1:  # a fixed set of single images, each its own size
        inputs = [[batches[i % len(batches)].images[i // len(batches)]] for i in range(min(8, settings.batch * len(batches)))]
    else:
        inputs = [b.images[:batch_size] for b in batches]

    def step(i: int) -> None:
        with torch.inference_mode(), _autocast(settings, device):
            model(inputs[i % len(inputs)])

    times = time_calls(step, device, max(settings.infer_warmup, len(inputs)), settings.infer_iters)
    median = statistics.median(times)
    result = {f"infer_b{batch_size}_images_per_s": batch_size * 1000.0 / median, f"infer_b{batch_size}_ms": median}
    if device.type == "cuda":
        result[f"infer_b{batch_size}_syncs"] = count_syncs(lambda: step(0), device)
    return result


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
