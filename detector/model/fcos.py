"""The FCOS detector: backbone -> FPN -> head, with the recipe's losses and post-processing.

Contracts follow torchvision's FCOS. ``forward(images, targets)`` takes a list of (3, H_i, W_i)
RGB images in 0..1; in train mode it returns ``{"classification", "bbox_regression",
"bbox_ctrness"}`` scalar losses, in eval mode one ``{"boxes" (M, 4) xyxy, "scores" (M,),
"labels" (M,)}`` per image in that image's pixel coordinates. The model does not resize: images
are normalised as the backbone expects and zero-padded (bottom/right) to a multiple of 32.

The pieces are reusable on their own: ``preprocess`` (normalise + pad), ``forward_features``
(padded batch -> [P3..P7]), and the module-level ``compute_losses`` / ``postprocess`` that act on
head outputs alone. ``loss_impl`` / ``postprocess_impl`` / ``points_cache`` / ``graphs`` default
to those reference functions (no cache, no CUDA graphs); :mod:`detector.fast.switch` swaps in
equivalent faster ones. ``train_graphs`` (default None) is the opt-in CUDA-graph capture of the
training step's network part (:mod:`detector.fast.graphs.training`), with its optional padding rule.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detector.model.backbone import Backbone
from detector.data.transforms import pad_batch, unit_float
from detector.model.loss import compute_losses
from detector.model.points import Points, points_for
from detector.model.postprocess import postprocess
from detector.model.recipe import Recipe


def _check_inputs(images: list[Tensor], targets: list[dict[str, Tensor]] | None, training: bool) -> None:
    if not images:
        raise ValueError("FCOS: got no images; pass a list of (3, H, W) tensors")
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"FCOS: image {index} has shape {tuple(image.shape)}, expected (3, H, W) RGB")
    if not training:
        return
    if targets is None or len(targets) != len(images):
        raise ValueError("FCOS: train mode needs one target dict per image "
                         f"(got {0 if targets is None else len(targets)} for {len(images)} images)")
    for index, target in enumerate(targets):
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"FCOS: target {index} has boxes {tuple(boxes.shape)} and labels "
                             f"{tuple(labels.shape)}; expected (K, 4) xyxy boxes and (K,) labels")
    if not _any_degenerate(targets):  # one device sync for the whole batch
        return
    for index, target in enumerate(targets):  # only on failure: find and name the box
        boxes = target["boxes"]
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)  # (K,)
        if degenerate.any():
            box = boxes[degenerate.nonzero()[0, 0]].tolist()
            raise ValueError(f"FCOS: target {index} has a box with no area {box}; boxes are (x1, y1, x2, y2) "
                             "with x2 > x1 and y2 > y1 (drop empty boxes in the data pipeline)")


def _any_degenerate(targets: list[dict[str, Tensor]]) -> bool:
    """Whether any box of the batch has x2 <= x1 or y2 <= y1, with one host sync per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for target in targets:
        if target["boxes"].numel():
            by_device.setdefault(target["boxes"].device, []).append(target["boxes"])
    for boxes in by_device.values():
        stacked = torch.cat(boxes)  # (sum K, 4)
        if bool((stacked[:, 2:] <= stacked[:, :2]).any()):
            return True
    return False


class FCOS(nn.Module):
    """An FCOS detector assembled from a backbone, an FPN and a head.

    backbone: a :class:`Backbone` (gives the input normalisation); fpn: ``dict[level, Tensor]
    -> [P3..P7]``; head: ``[P3..P7] -> {"cls_logits", "bbox_reg", "centerness"}`` per-level lists;
    num_classes: foreground classes (labels 0..C-1, no background class); recipe: the training and
    inference rules (``detector.model.recipe.Recipe``).
    """

    def __init__(self, backbone: Backbone, fpn: nn.Module, head: nn.Module, num_classes: int, recipe: Recipe,
                 size_divisible: int = 32) -> None:
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.num_classes, self.recipe, self.size_divisible = num_classes, recipe, size_divisible
        self.input_format = backbone.input_format
        # not persistent: they follow the backbone choice, not the checkpoint
        self.register_buffer("pixel_mean", torch.tensor(backbone.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.pixel_std).view(3, 1, 1), persistent=False)
        # Swappable implementations (detector.fast.switch installs equivalent faster ones).
        self.loss_impl = compute_losses
        self.postprocess_impl = postprocess
        self.points_cache = None  # a detector.fast.switch.PointsCache once installed
        self.graphs = None  # a detector.fast.graphs.inference.GraphedInference once installed
        self.train_graphs = None  # a detector.fast.graphs.training.GraphedTraining once installed

    def normalize(self, image: Tensor) -> Tensor:
        """(3, H, W) RGB in 0..1 (float) or 0..255 (uint8) -> what the backbone was trained on (same shape)."""
        image = unit_float(image.to(self.pixel_mean.device, non_blocking=True)).to(torch.float32)
        if self.input_format == "bgr255":
            image = image.flip(0) * 255.0  # RGB 0..1 -> BGR 0..255
        return (image - self.pixel_mean) / self.pixel_std

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad: list of (3, H_i, W_i) -> ((N, 3, H, W), [(H_i, W_i)]).

        Where the training graph applies (``train_graphs``: CUDA, train mode, autograd on), the batch
        is padded further to that graph's bucket shape (its ``pad_to`` / ``multiple`` rule)."""
        padded, sizes = pad_batch([self.normalize(image) for image in images], self.size_divisible)
        if self.train_graphs is not None and self.train_graphs.applies(self, padded):
            padded = self.train_graphs.pad(padded)
        return padded, sizes

    def forward_features(self, padded: Tensor) -> list[Tensor]:
        """Normalised padded batch (N, 3, H, W) -> pyramid [P3..P7], each (N, width, H/s, W/s)."""
        return self.fpn(self.backbone(padded))

    def points(self, features: list[Tensor]) -> Points:
        if self.points_cache is not None:
            return self.points_cache.get(features, self.recipe.point_offset)
        return points_for(features, self.recipe.point_offset)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Train mode: dict of scalar losses. Eval mode: list of detection dicts (see module doc)."""
        _check_inputs(images, targets, self.training)
        padded, image_sizes = self.preprocess(images)  # (N, 3, H, W)
        if self.train_graphs is not None and self.train_graphs.applies(self, padded):
            features, head_out = self.train_graphs.run(self, padded)  # graphed forward + backward
        elif self.graphs is not None and self.graphs.applies(self, padded):
            features, head_out = self.graphs.run(self, padded)  # CUDA-graph replay, same values
        else:
            features = self.forward_features(padded)
            head_out = self.head(features)
        points = self.points(features)
        if self.training:
            return self.loss_impl(head_out, points, targets, self.recipe, self.num_classes)
        return self.postprocess_impl(head_out, points, image_sizes, self.recipe)
