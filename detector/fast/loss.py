"""FCOS losses without a host sync: the same values as :func:`detector.model.loss.compute_losses`.

The reference gathers the positive points with ``nonzero`` -- the CPU waits for the GPU to finish
the forward pass before it can queue the loss and the backward pass. Here every point of every
image is kept and the box and centerness terms are masked instead:

- class targets come from one ``scatter_`` of the matched labels (weight 1 on foreground points);
- background points get a stand-in prediction and target (unit distances, or the unit box around
  the point for GIoU) *before* the loss math, so every term is finite and its gradient exactly zero;
- sums run over all points with the foreground (or centerness-target) weights;
- the GIoU loss is computed without torchvision's boolean-mask assignment (:func:`giou_loss`).

The per-point values are the reference's; only the summation order differs (float32 results agree
to ~1e-6 relative). The recipe's size ranges are kept on the device (:class:`SizeRangeCache`)
so target assignment does not copy them from the host each step.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from detector.model.loss import iou_loss, reduce_num_positives
from detector.model.points import Points, flatten_head_outputs
from detector.model.recipe import Recipe
from detector.model.targets import assign_targets, centerness_target, encode_distances


class SizeRangeCache:
    """``recipe.size_ranges`` as a (levels, 2) float32 tensor, one copy per (ranges, device)."""

    def __init__(self) -> None:
        self._tensors: dict[tuple, Tensor] = {}

    def get(self, recipe: Recipe, device: torch.device) -> Tensor:
        key = (recipe.size_ranges, str(device), torch.is_inference_mode_enabled())  # no inference tensors in training
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(recipe.size_ranges, dtype=torch.float32, device=device)
        return self._tensors[key]


_SIZE_RANGES = SizeRangeCache()


def _decode_dense(points: Points, distances: Tensor, box_coding: str) -> Tensor:
    """Distances (N, P, 4) (l, t, r, b) in recipe units -> boxes (N, P, 4) xyxy pixels."""
    if box_coding == "linear_by_size":
        distances = distances * points.strides.view(1, -1, 1)
    x, y = points.xy[:, 0].view(1, -1), points.xy[:, 1].view(1, -1)  # (1, P)
    return torch.stack([x - distances[..., 0], y - distances[..., 1],
                        x + distances[..., 2], y + distances[..., 3]], dim=-1)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of xyxy boxes (..., 4) -> (...), torchvision's ``generalized_box_iou_loss`` formula.

    torchvision writes the intersection through a boolean mask (``t[mask] = ...``), which syncs on
    GPU; here it is a ``torch.where`` -- the same values and gradients.
    """
    x1, y1, x2, y2 = pred.unbind(-1)
    gx1, gy1, gx2, gy2 = target.unbind(-1)
    inter_w = torch.minimum(x2, gx2) - torch.maximum(x1, gx1)
    inter_h = torch.minimum(y2, gy2) - torch.maximum(y1, gy1)
    overlap = (inter_w > 0) & (inter_h > 0)
    intersection = torch.where(overlap, inter_w * inter_h, torch.zeros_like(inter_w))
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - intersection
    iou = intersection / (union + eps)
    enclosing = (torch.maximum(x2, gx2) - torch.minimum(x1, gx1)) * (torch.maximum(y2, gy2) - torch.minimum(y1, gy1))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def compute_losses_dense(head_out: dict[str, list[Tensor]], points: Points, targets: list[dict[str, Tensor]],
                         recipe: Recipe, num_classes: int) -> dict[str, Tensor]:
    """Drop-in for :func:`detector.model.loss.compute_losses` (same arguments, keys and values)."""
    cls_logits, bbox_reg, centerness = (t.float() for t in flatten_head_outputs(head_out))
    # (N, P, C), (N, P, 4), (N, P)
    assigned = assign_targets(points, targets, recipe, _SIZE_RANGES.get(recipe, points.xy.device))
    foreground = assigned.foreground  # (N, P) bool
    weight = foreground.to(cls_logits.dtype)  # (N, P)
    num_positives = reduce_num_positives(foreground.sum()).clamp(min=1.0)

    labels = assigned.labels.clamp(min=0).unsqueeze(-1)  # (N, P, 1)
    class_targets = torch.zeros_like(cls_logits).scatter_(2, labels, weight.unsqueeze(-1))  # (N, P, C)
    loss_cls = sigmoid_focal_loss(cls_logits, class_targets, alpha=recipe.focal_alpha,
                                  gamma=recipe.focal_gamma, reduction="sum")

    fg = foreground.unsqueeze(-1)  # (N, P, 1)
    target_distances = torch.where(fg, encode_distances(points, assigned.boxes), 1.0)  # (N, P, 4) pixels
    ctr_targets = centerness_target(target_distances)  # (N, P); 1 on background
    pred_reg = torch.where(fg, bbox_reg, 1.0)  # (N, P, 4) recipe units
    if recipe.box_loss == "giou":
        pred_boxes = _decode_dense(points, pred_reg, recipe.box_coding)  # (N, P, 4)
        target_boxes = torch.where(fg, assigned.boxes, _decode_dense(points, torch.ones_like(pred_reg), "pixels"))
        per_point = giou_loss(pred_boxes, target_boxes)  # (N, P)
        loss_box = (per_point * weight).sum() / num_positives
    else:
        scale = points.strides.view(1, -1, 1) if recipe.box_coding == "linear_by_size" else 1.0
        per_point = iou_loss((pred_reg * scale).reshape(-1, 4), target_distances.reshape(-1, 4))
        box_weight = ctr_targets * weight  # (N, P)
        loss_box = (per_point.view_as(box_weight) * box_weight).sum() / reduce_num_positives(
            box_weight.sum()).clamp(min=1e-6)

    loss_ctr = F.binary_cross_entropy_with_logits(centerness, ctr_targets, weight=weight, reduction="sum")
    return {
        "classification": loss_cls / num_positives,
        "bbox_regression": loss_box,
        "bbox_ctrness": loss_ctr / num_positives,
    }
