"""FCOS target assignment: which ground-truth box (if any) each point regresses.

A point is positive for a box when it lies strictly inside the box, the largest of its four
distances (l, t, r, b) falls in its level's size range, and (with center sampling) it lies within
``radius * stride`` of the box center in both axes. Among several such boxes the smallest-area one
wins. The whole batch is assigned at once: boxes are padded to the largest count in the batch
and masked, so there is no Python loop over points, boxes or images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detector.model.points import Points
from detector.model.recipe import Recipe


@dataclass(frozen=True)
class MatchedTargets:
    """Per-point assignment for a batch of N images and P points.

    matched: (N, P) int64 index into the image's ``boxes``, -1 for background.
    labels: (N, P) int64 class of the matched box, -1 for background.
    boxes: (N, P, 4) matched box (x1, y1, x2, y2) in image pixels, zeros for background.
    """

    matched: Tensor
    labels: Tensor
    boxes: Tensor

    @property
    def foreground(self) -> Tensor:
        return self.matched >= 0  # (N, P) bool


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image boxes/labels, padding to the largest box count M.

    Returns boxes (N, M, 4), labels (N, M) int64 and valid (N, M) bool.
    """
    num_images = len(targets)
    max_boxes = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros(num_images, max_boxes, 4, device=device, dtype=dtype)
    labels = torch.full((num_images, max_boxes), -1, device=device, dtype=torch.int64)
    valid = torch.zeros(num_images, max_boxes, device=device, dtype=torch.bool)
    for index, target in enumerate(targets):  # copying only; the assignment itself is batched
        count = len(target["boxes"])
        boxes[index, :count] = target["boxes"].to(device=device, dtype=dtype)
        labels[index, :count] = target["labels"].to(device=device)
        valid[index, :count] = True
    return boxes, labels, valid


def assign_targets(points: Points, targets: list[dict[str, Tensor]], recipe: Recipe,
                   size_ranges: Tensor | None = None) -> MatchedTargets:
    """Assign every point of every image to at most one box (smallest area among candidates).

    ``size_ranges``: ``recipe.size_ranges`` as a (levels, 2) float tensor on the points' device,
    if the caller keeps one (building it here is a blocking host-to-device copy on GPU).
    """
    device = points.xy.device
    boxes, labels, valid = pad_targets(targets, device)  # (N, M, 4), (N, M), (N, M)
    num_images, num_points = len(targets), points.xy.shape[0]
    if boxes.shape[1] == 0:
        background = torch.full((num_images, num_points), -1, device=device, dtype=torch.int64)
        return MatchedTargets(background, background.clone(),
                              torch.zeros(num_images, num_points, 4, device=device))

    x = points.xy[:, 0].view(1, -1, 1)  # (1, P, 1)
    y = points.xy[:, 1].view(1, -1, 1)
    x1, y1, x2, y2 = (boxes[..., k].unsqueeze(1) for k in range(4))  # (N, 1, M) each
    left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y  # (N, P, M) each

    nearest_side = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom))
    farthest_side = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    candidate = (nearest_side > 0) & valid.unsqueeze(1)  # (N, P, M)

    if size_ranges is None:
        size_ranges = points.xy.new_tensor(recipe.size_ranges)  # (levels, 2)
    ranges = size_ranges[points.levels]  # (P, 2)
    low, high = ranges[:, 0].view(1, -1, 1), ranges[:, 1].view(1, -1, 1)
    if recipe.size_range_inclusive:
        candidate &= (farthest_side >= low) & (farthest_side <= high)
    else:
        candidate &= (farthest_side > low) & (farthest_side < high)

    if recipe.center_sampling:
        radius = (recipe.center_sampling_radius * points.strides).view(1, -1, 1)  # (1, P, 1)
        center_dx = (x - (x1 + x2) / 2).abs()  # (N, P, M)
        center_dy = (y - (y1 + y2) / 2).abs()
        candidate &= torch.maximum(center_dx, center_dy) < radius

    areas = ((x2 - x1) * (y2 - y1)).expand_as(candidate)  # (N, P, M)
    areas = torch.where(candidate, areas, torch.full_like(areas, float("inf")))
    smallest_area, matched = areas.min(dim=2)  # (N, P) each; ties -> lowest box index
    matched = torch.where(torch.isinf(smallest_area), torch.full_like(matched, -1), matched)

    safe = matched.clamp(min=0)  # (N, P) valid gather index
    matched_labels = torch.gather(labels, 1, safe)  # (N, P)
    matched_boxes = torch.gather(boxes, 1, safe.unsqueeze(-1).expand(-1, -1, 4))  # (N, P, 4)
    foreground = matched >= 0
    matched_labels = torch.where(foreground, matched_labels, torch.full_like(matched_labels, -1))
    matched_boxes = matched_boxes * foreground.unsqueeze(-1)
    return MatchedTargets(matched, matched_labels, matched_boxes)


def encode_distances(points: Points, boxes: Tensor) -> Tensor:
    """Distances (l, t, r, b) in pixels from each point to its box: (..., P, 4) for boxes (..., P, 4)."""
    x, y = points.xy[:, 0], points.xy[:, 1]  # (P,)
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)


def centerness_target(distances: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for distances (..., 4) -> (...)."""
    # unbind, not distances[..., [0, 2]]: a list index is copied host-to-device (a sync) on GPU
    left, top, right, bottom = distances.unbind(-1)
    ratio_x = torch.minimum(left, right) / torch.maximum(left, right)
    ratio_y = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt(ratio_x * ratio_y)


def decode_boxes(xy: Tensor, strides: Tensor, distances: Tensor, box_coding: str) -> Tensor:
    """Regression outputs in recipe units -> boxes (x1, y1, x2, y2) in pixels.

    xy: (K, 2) points, strides: (K,), distances: (K, 4) as (l, t, r, b); returns (K, 4).
    """
    if box_coding == "linear_by_size":
        distances = distances * strides.unsqueeze(-1)  # (K, 4) in pixels
    x, y = xy[:, 0], xy[:, 1]  # (K,)
    return torch.stack([x - distances[:, 0], y - distances[:, 1],
                        x + distances[:, 2], y + distances[:, 3]], dim=-1)
