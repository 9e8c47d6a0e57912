"""FCOS inference with few host syncs: the same detections as :func:`detector.model.postprocess.postprocess`.

The reference walks images x levels and calls ``torch.where`` on each score map -- one host sync
per (image, level), each stalling the CPU until the GPU is done. Here scoring, thresholding,
per-level top-k, decoding and clipping run for the whole batch at once: candidates below the
threshold get the score -1 and are ranked last by ``topk``, so each level's best
``min(topk_per_level, passing)`` are the reference's candidates, in the same order. One sync
reads how many candidates each image kept; NMS then runs per image, as in the reference (a batched
NMS over all images would compare every pair of boxes of the batch).

Ties: when several candidates have exactly the same score at the top-k boundary, the two
implementations may keep different ones of them (``topk`` does not order ties); with float32
scores this practically never happens, with bf16 heads it can (scores repeat more often).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detector.model.points import Points
from detector.model.recipe import Recipe

BELOW_THRESHOLD = -1.0  # scores are probabilities (>= 0): this ranks after every passing candidate


def _level_topk(logits: Tensor, ctr_logits: Tensor, recipe: Recipe, k: int) -> tuple[Tensor, Tensor]:
    """One level, whole batch: logits (N, HW, C), ctr_logits (N, HW) -> scores, flat indices (N, k)."""
    class_prob = torch.sigmoid(logits)  # (N, HW, C)
    scores = class_prob * torch.sigmoid(ctr_logits).unsqueeze(-1)  # (N, HW, C)
    if recipe.score_formula == "sqrt_product":
        scores = torch.sqrt(scores)
    gate = class_prob if recipe.threshold_on == "cls" else scores
    ranked = torch.where(gate > recipe.score_thresh, scores, BELOW_THRESHOLD).flatten(1)  # (N, HW*C)
    return ranked.topk(min(k, ranked.shape[1]), dim=1)  # (N, k) each


@torch.no_grad()
def postprocess_batched(head_out: dict[str, list[Tensor]], points: Points, image_sizes: list[tuple[int, int]],
                        recipe: Recipe) -> list[dict[str, Tensor]]:
    """Drop-in for :func:`detector.model.postprocess.postprocess` (same arguments and results)."""
    device = points.xy.device
    # (N, 1) bounds; a non-blocking copy of a few numbers, not a sync
    sizes = torch.tensor(image_sizes, dtype=torch.float32).to(device, non_blocking=True)
    max_y, max_x = sizes[:, 0:1], sizes[:, 1:2]
    xy_per_level = points.xy.split(points.num_per_level)  # [(HW_l, 2)]
    strides_per_level = points.strides.split(points.num_per_level)  # [(HW_l,)]
    all_scores, all_boxes, all_labels = [], [], []
    for level, (xy, strides) in enumerate(zip(xy_per_level, strides_per_level)):
        logits = head_out["cls_logits"][level].flatten(2).transpose(1, 2).float()  # (N, HW, C)
        reg = head_out["bbox_reg"][level].flatten(2).transpose(1, 2).float()  # (N, HW, 4)
        ctr = head_out["centerness"][level].flatten(1).float()  # (N, HW)
        num_classes = logits.shape[-1]
        scores, flat_idx = _level_topk(logits, ctr, recipe, recipe.topk_per_level)  # (N, k)
        point_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")  # (N, k)
        distances = reg.gather(1, point_idx.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
        if recipe.box_coding == "linear_by_size":
            distances = distances * strides[point_idx].unsqueeze(-1)
        x, y = xy[point_idx, 0], xy[point_idx, 1]  # (N, k)
        x1 = (x - distances[..., 0]).clamp(min=0).minimum(max_x)
        y1 = (y - distances[..., 1]).clamp(min=0).minimum(max_y)
        x2 = (x + distances[..., 2]).clamp(min=0).minimum(max_x)
        y2 = (y + distances[..., 3]).clamp(min=0).minimum(max_y)
        all_boxes.append(torch.stack([x1, y1, x2, y2], dim=-1))  # (N, k, 4)
        all_scores.append(scores)
        all_labels.append(flat_idx % num_classes)
    scores, boxes, labels = torch.cat(all_scores, 1), torch.cat(all_boxes, 1), torch.cat(all_labels, 1)
    passing = scores > BELOW_THRESHOLD  # (N, T)
    # passing candidates first, each image keeping the reference's (level, rank) order
    order = torch.sort((~passing).to(torch.uint8), dim=1, stable=True).indices  # (N, T)
    scores, labels = scores.gather(1, order), labels.gather(1, order)
    boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    counts = passing.sum(1).tolist()  # the one sync before NMS
    detections = []
    for image, count in enumerate(counts):
        image_boxes, image_scores, image_labels = boxes[image, :count], scores[image, :count], labels[image, :count]
        keep = batched_nms(image_boxes, image_scores, image_labels, recipe.nms_thresh)[: recipe.detections_per_image]
        detections.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]})
    return detections
