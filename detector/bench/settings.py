"""What the bench measures: its settings (:class:`BenchSettings`), the rows (:class:`Variant`) and
the random COCO-shaped batches' type (:class:`Batch`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from detector.errors import UserError
from detector.fast.switch import FAST_PATHS


TORCHVISION_LAYOUTS = ("frozen_bn", "bn", "none")
PRECISIONS = ("bf16", "fp32")
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
GB = 1e9


class BenchError(UserError):
    """A bench setting is out of range."""


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how. Sizes follow COCO training: short side 800, long side <= 1333."""

    device: str = "cuda"
    batch: int = 16
    infer_batches: tuple[int, ...] = (1, 8)
    short_side: int = 800
    max_size: int = 1333
    boxes_per_image: int = 7
    num_classes: int = 80
    width: int = 256
    backbone: str = "resnet50"
    precision: str = "bf16"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    warmup: int = 5
    iters: int = 20
    infer_warmup: int = 8
    infer_iters: int = 24
    num_batches: int = 4
    lr: float = 1e-3
    seed: int = 0
    self_check: bool = True
    time_limit: float = 0.0  # seconds; rows starting later are skipped (0 = no limit)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BenchError(f"bench.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        positive = {"batch": self.batch, "iters": self.iters, "infer_iters": self.infer_iters,
                    "num_batches": self.num_batches, "short_side": self.short_side, "width": self.width,
                    "num_classes": self.num_classes, "boxes_per_image": self.boxes_per_image}
        bad = [f"{k}={v}" for k, v in positive.items() if int(v) < 1]
        if bad or self.warmup < 0 or self.infer_warmup < 0:
            raise BenchError(f"bench: {', '.join(bad) or 'warmup'} must be positive (warmup >= 0)")
        if self.max_size < self.short_side:
            raise BenchError(f"bench: max_size={self.max_size} is smaller than short_side={self.short_side}")
        if any(b < 1 or b > self.batch for b in self.infer_batches):
            raise BenchError(f"bench.infer_batches={list(self.infer_batches)}: each must be in 1..batch ({self.batch})")


@dataclass(frozen=True)
class Variant:
    """One row of the table: which model, with which code paths."""

    name: str
    model: str = "ours"  # ours | torchvision
    fast_paths: tuple[str, ...] = FAST_PATHS
    deform_impl: str = "torchvision"
    compile: tuple[str, ...] = ()
    torchvision_layout: str = "frozen_bn"
    train: bool = True
    infer: bool = True
    cuda_graph: bool = False  # ours: training step's network part replayed from a CUDA graph
    arch: str | None = None  # ours: this architecture instead of the bench's (bench.also_arch)


@dataclass
class Batch:
    images: list[Tensor]  # (3, H_i, W_i) RGB in 0..1 on the device
    targets: list[dict[str, Tensor]]  # boxes (K, 4) xyxy pixels, labels (K,)
