"""Load torchvision FCOS weights into our detector.

``torchvision_fcos_to_ours`` renames a ``torchvision.models.detection.fcos_resnet50_fpn`` state
dict (e.g. its COCO weights) for our ``arch=fcos recipe=torchvision backbone=resnet50`` detector,
i.e. ``FCOS(build_backbone("resnet50"), StandardFPN(...), FCOSHead(..., centerness_on="reg",
box_activation="relu"), ...)``. Tensors are not copied or changed; only names are.
"""
from __future__ import annotations

import re

from torch import Tensor

from detector.errors import UserError


class ConversionError(UserError):
    """A state dict holds a key that the torchvision FCOS layout does not have."""


# (torchvision pattern, our name); FPN keys may lack the ".0" of torchvision < 0.13 checkpoints
_RENAMES = (
    (r"backbone\.body\.(.+)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"fpn.lateral_convs.\1.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"fpn.output_convs.\1.\2"),
    (r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)", r"fpn.\1.\2"),
    (r"head\.classification_head\.conv\.(.+)", r"head.cls_tower.\1"),
    (r"head\.classification_head\.cls_logits\.(.+)", r"head.cls_logits.\1"),
    (r"head\.regression_head\.conv\.(.+)", r"head.reg_tower.\1"),
    (r"head\.regression_head\.bbox_reg\.(.+)", r"head.bbox_reg.\1"),
    (r"head\.regression_head\.bbox_ctrness\.(.+)", r"head.centerness.\1"),
)
_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in _RENAMES)


def _rename(key: str) -> str:
    for pattern, replacement in _COMPILED:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    raise ConversionError(f"convert: '{key}' is not a torchvision fcos_resnet50_fpn parameter; pass the "
                          "state dict of torchvision.models.detection.fcos_resnet50_fpn")


def torchvision_fcos_to_ours(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename every key of a torchvision ``fcos_resnet50_fpn`` state dict to our detector's names.

    BatchNorm ``num_batches_tracked`` entries are kept (FrozenBatchNorm2d ignores them on load).
    Load the result with ``detector.load_state_dict(converted)``; a different ``num_classes``
    shows up there as a size mismatch of ``head.cls_logits``.
    """
    return {_rename(key): value for key, value in state_dict.items()}
