"""FCOS inference: head outputs -> per-image detections (score threshold, top-k, decode, NMS).

Per image and level: keep (point, class) pairs passing the score threshold, the best
``topk_per_level`` of them, decode their boxes and clip them to the image; then class-wise NMS over
all levels and the ``detections_per_image`` best. Scores follow the recipe: ``product``
(sigmoid(cls) * sigmoid(ctr)) or ``sqrt_product``; the threshold applies to the class probability
(``threshold_on=cls``) or to the score.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from detector.model.points import Points
from detector.model.recipe import Recipe
from detector.model.targets import decode_boxes


def _level_candidates(logits: Tensor, ctr_logits: Tensor, recipe: Recipe) -> tuple[Tensor, Tensor]:
    """One image, one level: logits (HW, C), ctr_logits (HW,) -> (scores (K,), flat indices (K,))."""
    class_prob = torch.sigmoid(logits)  # (HW, C)
    scores = class_prob * torch.sigmoid(ctr_logits).unsqueeze(1)  # (HW, C)
    if recipe.score_formula == "sqrt_product":
        scores = torch.sqrt(scores)
    gate = class_prob if recipe.threshold_on == "cls" else scores
    keep = gate.flatten() > recipe.score_thresh  # (HW*C,)
    flat_idx = torch.where(keep)[0]  # (K0,)
    kept_scores = scores.flatten()[keep]  # (K0,)
    kept_scores, order = kept_scores.topk(min(recipe.topk_per_level, kept_scores.numel()))
    return kept_scores, flat_idx[order]


@torch.no_grad()
def postprocess(head_out: dict[str, list[Tensor]], points: Points, image_sizes: list[tuple[int, int]],
                recipe: Recipe) -> list[dict[str, Tensor]]:
    """Detections for each image of a batch.

    head_out: per-level maps ``cls_logits (N, C, H_l, W_l)``, ``bbox_reg (N, 4, H_l, W_l)``,
    ``centerness (N, 1, H_l, W_l)``; points: their ``Points``; image_sizes: (h, w) of each image
    before padding. Returns, per image, ``{"boxes": (M, 4) xyxy pixels clipped to (h, w),
    "scores": (M,), "labels": (M,) int64 in 0..C-1}``, sorted by decreasing score, M <= 100.
    """
    xy_per_level = points.xy.split(points.num_per_level)  # [(HW_l, 2)]
    strides_per_level = points.strides.split(points.num_per_level)  # [(HW_l,)]
    detections = []
    for image, (height, width) in enumerate(image_sizes):
        image_boxes, image_scores, image_labels = [], [], []
        for level, (xy, strides) in enumerate(zip(xy_per_level, strides_per_level)):
            logits = head_out["cls_logits"][level][image].flatten(1).t().float()  # (HW, C)
            reg = head_out["bbox_reg"][level][image].flatten(1).t().float()  # (HW, 4)
            ctr = head_out["centerness"][level][image].flatten().float()  # (HW,)
            num_classes = logits.shape[1]
            scores, flat_idx = _level_candidates(logits, ctr, recipe)  # (K,), (K,)
            point_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")  # (K,)
            boxes = decode_boxes(xy[point_idx], strides[point_idx], reg[point_idx], recipe.box_coding)
            image_boxes.append(clip_boxes_to_image(boxes, (height, width)))  # (K, 4)
            image_scores.append(scores)
            image_labels.append(flat_idx % num_classes)
        boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
        keep = batched_nms(boxes, scores, labels, recipe.nms_thresh)[: recipe.detections_per_image]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections
