"""Detection data: COCO-format loading, the synthetic shapes generator, transforms.

Import from the submodules (`detector.data.coco`, `.synthetic`, `.transforms`, `.errors`); the
names below are re-exported for convenience, lazily (PEP 562), so that importing one submodule
(e.g. `detector.data.transforms` from the model code) does not import pycocotools, which machines
that only train or benchmark a decoder may lack.
"""

import importlib

_EXPORTS = {
    "CocoDetection": "coco",
    "build_dataset": "coco",
    "build_loader": "coco",
    "resolve_data_root": "coco",
    "DataError": "errors",
    "ensure_synthetic": "synthetic",
    "write_dataset": "synthetic",
    "DetectionTransform": "transforms",
    "collate": "transforms",
    "pad_batch": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detector.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"detector.data.{_EXPORTS[name]}"), name)
