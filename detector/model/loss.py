"""FCOS losses from head outputs and ground truth: classification, box regression, centerness.

``compute_losses`` works on head outputs alone (any FPN/head, including searched ones and decoders
trained on cached features) and returns torchvision's loss names. Every normaliser goes through
``reduce_num_positives`` so that, under DDP, all processes divide by the same average count.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detector.model.points import Points, flatten_head_outputs
from detector.model.recipe import Recipe
from detector.model.targets import assign_targets, centerness_target, decode_boxes, encode_distances

LOSS_NAMES = ("classification", "bbox_regression", "bbox_ctrness")


def reduce_num_positives(n: Tensor) -> Tensor:
    """Average a loss normaliser across processes when torch.distributed is initialised.

    Each process sees a different number of positives; dividing by the local count would weight
    images unevenly across GPUs. Every process must call this (it is a collective), even with zero
    positives. Returns a float tensor; unchanged in a single process.
    """
    n = n.detach().float()
    if dist.is_available() and dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
        n = n / dist.get_world_size()
    return n


def iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """-log IoU of boxes given as distances (l, t, r, b) from the same point: (K, 4) -> (K,).

    Areas are smoothed by +1 as in the FCOS authors' code, so the loss stays finite for empty
    predictions.
    """
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    intersection = inter_w * inter_h
    union = pred_area + target_area - intersection
    return -torch.log((intersection + 1.0) / (union + 1.0))


def compute_losses(head_out: dict[str, list[Tensor]], points: Points, targets: list[dict[str, Tensor]],
                   recipe: Recipe, num_classes: int) -> dict[str, Tensor]:
    """Named scalar losses for a batch.

    head_out: ``{"cls_logits": [(N, C, H_l, W_l)], "bbox_reg": [(N, 4, H_l, W_l)],
    "centerness": [(N, 1, H_l, W_l)]}`` for P3..P7; points: from ``make_points`` for those maps;
    targets: per image ``{"boxes": (K, 4) xyxy pixels, "labels": (K,) int64 in 0..C-1}``.
    Returns ``{"classification", "bbox_regression", "bbox_ctrness"}``: focal loss over all points
    and classes, the recipe's box loss and the centerness BCE over positives, each divided by the
    (process-averaged) number of positives, or for ``box_loss=iou`` by the summed centerness target.
    An image without boxes contributes only negatives.
    """
    cls_logits, bbox_reg, centerness = (t.float() for t in flatten_head_outputs(head_out))
    # (N, P, C), (N, P, 4), (N, P)
    assigned = assign_targets(points, targets, recipe)
    foreground = assigned.foreground  # (N, P)
    num_positives = reduce_num_positives(foreground.sum()).clamp(min=1.0)

    class_targets = torch.zeros_like(cls_logits)  # (N, P, C)
    image_idx, point_idx = foreground.nonzero(as_tuple=True)  # (K,), (K,)
    class_targets[image_idx, point_idx, assigned.labels[image_idx, point_idx]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, class_targets, alpha=recipe.focal_alpha,
                                  gamma=recipe.focal_gamma, reduction="sum")

    target_distances = encode_distances(points, assigned.boxes)[image_idx, point_idx]  # (K, 4) pixels
    ctr_targets = centerness_target(target_distances)  # (K,)
    pred_reg = bbox_reg[image_idx, point_idx]  # (K, 4) recipe units
    if recipe.box_loss == "giou":
        pred_boxes = decode_boxes(points.xy[point_idx], points.strides[point_idx], pred_reg,
                                  recipe.box_coding)  # (K, 4)
        loss_box = generalized_box_iou_loss(pred_boxes, assigned.boxes[image_idx, point_idx],
                                            reduction="sum") / num_positives
    else:
        scale = points.strides[point_idx].unsqueeze(1) if recipe.box_coding == "linear_by_size" else 1.0
        weighted = (iou_loss(pred_reg * scale, target_distances) * ctr_targets).sum()
        loss_box = weighted / reduce_num_positives(ctr_targets.sum()).clamp(min=1e-6)

    loss_ctr = F.binary_cross_entropy_with_logits(centerness[image_idx, point_idx], ctr_targets,
                                                  reduction="sum")
    return {
        "classification": loss_cls / num_positives,
        "bbox_regression": loss_box,
        "bbox_ctrness": loss_ctr / num_positives,
    }
