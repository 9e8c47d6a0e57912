"""``python -m detector latency arch=<code>``: end-to-end inference latency on this device.

One call is what a deployed detector does per batch: normalise and pad the images, run backbone,
FPN and head, and post-process (threshold, top-k, decode, NMS), i.e. ``FCOS.forward`` in eval mode
(``runtime=torch``: PyTorch on ``device=`` cpu or cuda) or :class:`detector.deploy.onnx_runtime.OnnxDetector`
(``runtime=onnxruntime``: ONNX Runtime on the CPU, the file of ``onnx=`` or a temporary export of the
model with ``dcn=decomposed``). Inputs are ``latency.batch`` random images of ``latency.size``
``[H, W]``; ``latency.warmup`` untimed calls come first (allocation, autotuning), then
``latency.iters`` timed calls (wall clock, with a CUDA synchronisation per call on a GPU). Reported:
median and 90th percentile in milliseconds, plus the device, runtime, threads and settings.

The weights are random (``seed``) with the head's initial classification prior, so few candidates pass
the score threshold: post-processing costs what an untrained detector's does, which is a lower bound
for a trained one with many confident detections. ``arch=`` takes a code, zoo name, file or run dir;
``ckpt=`` measures a checkpoint's architecture and weights instead.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from detector.errors import UserError

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencySettings:
    """What one latency measurement runs (``latency.*`` of the config)."""

    size: tuple[int, int] = (800, 1333)
    batch: int = 1
    runtime: str = "torch"
    warmup: int = 3
    iters: int = 20
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"latency.runtime={self.runtime}: choose one of {', '.join(RUNTIMES)}")
        if len(self.size) != 2 or min(self.size) < 32:
            raise UserError(f"latency.size={list(self.size)}: give [H, W], each at least 32")
        if self.batch < 1 or self.iters < 1 or self.warmup < 0:
            raise UserError("latency: batch and iters must be >= 1 and warmup >= 0")

    @classmethod
    def from_cfg(cls, node: Any) -> "LatencySettings":
        threads = node.get("threads", None)
        return cls(size=tuple(int(v) for v in node.size), batch=int(node.batch), runtime=str(node.runtime),
                   warmup=int(node.warmup), iters=int(node.iters), threads=None if threads is None else int(threads))


def device_description(device: torch.device, settings: LatencySettings) -> str:
    """Where a latency was measured: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    threads = settings.threads or (os.cpu_count() if settings.runtime == "onnxruntime" else torch.get_num_threads())
    return f"cpu:{platform.machine()}:{os.cpu_count()}cores:{threads}threads:{settings.runtime}"


def time_calls(call: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall-clock milliseconds of ``iters`` calls after ``warmup`` untimed ones (``sync`` after each)."""
    for _ in range(warmup):
        call()
        sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median and 90th percentile (nearest rank) of a list of timings."""
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, max(0, int(round(0.9 * len(ordered))) - 1))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90}


def measure_latency(model: nn.Module, settings: LatencySettings, device: torch.device | str = "cpu",
                    onnx_path: str | Path | None = None, seed: int = 0, arch: str = "") -> dict[str, Any]:
    """End-to-end latency of an FCOS ``model`` (see the module doc); returns the record.

    ``arch`` only labels a temporary ONNX export (runtime onnxruntime without ``onnx_path``)."""
    device = torch.device(device)
    if settings.runtime == "onnxruntime" and device.type != "cpu":
        raise UserError("latency.runtime=onnxruntime runs on the CPU; use device=cpu (or runtime=torch on a GPU)")
    generator = torch.Generator().manual_seed(seed)
    height, width = settings.size
    images = [torch.rand(3, height, width, generator=generator) for _ in range(settings.batch)]
    previous_threads = torch.get_num_threads()
    if settings.threads and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    try:
        if settings.runtime == "torch":
            model = model.to(device).eval()
            images = [image.to(device) for image in images]
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

            def call() -> Any:
                with torch.inference_mode():
                    return model(images)

            times = time_calls(call, settings.warmup, settings.iters, sync)
        else:
            times = _onnxruntime_times(model, settings, images, onnx_path, arch)
    finally:
        torch.set_num_threads(previous_threads)
    return {**summarize(times), "times_ms": [round(t, 3) for t in times], "device": device_description(device, settings),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}}


def _onnxruntime_times(model: nn.Module, settings: LatencySettings, images: list[torch.Tensor],
                       onnx_path: str | Path | None, arch: str) -> list[float]:
    from detector.deploy.onnx_export import export_onnx
    from detector.deploy.onnx_runtime import OnnxDetector

    with tempfile.TemporaryDirectory(prefix="nasfcos-latency-") as tmp:
        if onnx_path is None:
            onnx_path = export_onnx(model.cpu().eval(), Path(tmp) / "model.onnx", arch, "decomposed",
                                    sample_size=(64, 64))
        runtime = OnnxDetector(onnx_path, "onnxruntime", threads=settings.threads)
        return time_calls(lambda: runtime(images), settings.warmup, settings.iters)


def latency_command(cfg: Any) -> dict[str, Any]:
    """``python -m detector latency arch=<code> [latency.size=[H,W] latency.batch= latency.runtime= device=]``."""
    from detector.engine.distributed import select_device
    from detector.deploy.onnx_export import model_for_export

    settings = LatencySettings.from_cfg(cfg.latency)
    device = select_device(str(cfg.device)) if settings.runtime == "torch" else torch.device("cpu")
    if cfg.get("ckpt", None):
        model, arch, _ = model_for_export(cfg)
    else:
        model, arch = random_detector(cfg)
    onnx_path = cfg.get("onnx", None) if settings.runtime == "onnxruntime" else None
    record = {"arch": arch, **measure_latency(model, settings, device, onnx_path, int(cfg.seed), arch)}
    if str(cfg.get("format", "text")) == "json":
        print(json.dumps(record))
    else:
        print(f"{arch}: median {record['median_ms']:.1f} ms, p90 {record['p90_ms']:.1f} ms per batch of "
              f"{settings.batch} at {settings.size[0]}x{settings.size[1]} on {record['device']} "
              f"({settings.iters} timed calls after {settings.warmup} warm-up)")
    return record


def random_detector(cfg: Any) -> tuple[nn.Module, str]:
    """The detector of ``cfg.arch`` with seeded random weights (the backbone's weights are not loaded)."""
    from detector.model.build import build_detector_from_cfg
    from detector.arch.zoo import resolve_arch

    arch = resolve_arch(str(cfg.arch))
    cfg.backbone.weights = "none"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = build_detector_from_cfg(cfg, arch)
    return model.eval(), str(arch)
