"""Detection data: COCO-format loading, the synthetic shapes generator, transforms.

Import from the submodules (`detector.data.coco`, `.synthetic`, `.transforms`, `.errors`); the
names below are re-exported for convenience.
"""

from detector.data.coco import CocoDetection, build_dataset, build_loader, resolve_data_root
from detector.data.errors import DataError
from detector.data.synthetic import ensure_synthetic, synth_command, write_dataset
from detector.data.transforms import DetectionTransform, collate, pad_batch

__all__ = [
    "CocoDetection",
    "DataError",
    "DetectionTransform",
    "build_dataset",
    "build_loader",
    "collate",
    "ensure_synthetic",
    "pad_batch",
    "resolve_data_root",
    "synth_command",
    "write_dataset",
]
