"""COCO box evaluation through pycocotools, silenced, returning plain floats.

`to_coco_results` turns model outputs into COCO result dicts; `evaluate_detections` scores
them against a ground-truth `COCO` index (``dataset.coco`` of `detector.data.coco.CocoDetection`)
and returns the 12 standard metrics:

    AP, AP50, AP75, APs, APm, APl      precision: IoU .50:.95, .50, .75; small, medium, large
    AR1, AR10, AR100, ARs, ARm, ARl    recall at 1/10/100 detections per image; by size (100 dets)

all in [0, 1]. pycocotools reports -1 for a metric with no ground truth to measure (e.g. APs
when the images hold no small object); here such a metric is 0.0, so values can be averaged,
plotted and compared safely. No detections at all gives every metric 0.0 (pycocotools' loadRes
cannot take an empty list, so it is not called). pycocotools' prints are swallowed;
`format_metrics` gives a table for logs.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict],
    label_to_cat_id: Sequence[int],
) -> list[dict]:
    """Model outputs -> COCO result dicts in ORIGINAL image pixels.

    `outputs[i]`: ``{boxes: (D, 4) xyxy in the resized image, scores: (D,), labels: (D,) in
    0..C-1}``; `targets[i]` supplies ``image_id``, ``scale`` (resized = original * scale) and
    ``orig_size`` (h, w), to which boxes are clipped. Each result is ``{image_id, category_id,
    bbox: [x, y, w, h], score}`` with plain Python numbers.
    """
    results = []
    for output, target in zip(outputs, targets, strict=True):
        boxes = output["boxes"].detach().float().cpu().reshape(-1, 4) / float(target["scale"])  # (D, 4)
        height, width = target["orig_size"]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, float(width))
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, float(height))
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        image_id = int(target["image_id"])
        for box, score, label in zip(xywh, scores, labels, strict=True):
            results.append(
                {"image_id": image_id, "category_id": int(label_to_cat_id[int(label)]), "bbox": box, "score": score}
            )
    return results


def evaluate_detections(
    coco_gt: COCO,
    detections: list[dict],
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """The 12 COCO box metrics (`METRIC_NAMES`) of `detections` against `coco_gt`.

    `image_ids` restricts evaluation to those images (default: every image of `coco_gt`), e.g.
    when only part of a split was run. -1 from pycocotools (nothing to measure) becomes 0.0.
    """
    if not detections:
        return {name: 0.0 for name in METRIC_NAMES}
    unknown = {int(d["image_id"]) for d in detections} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections name image ids the ground truth does not hold, e.g. {min(unknown)}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))  # loadRes writes into the dicts
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: max(float(value), 0.0) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def format_metrics(metrics: dict[str, float]) -> str:
    """Two-row text table of the metrics, in percent (AP 41.2 means 0.412)."""
    names = [n for n in METRIC_NAMES if n in metrics]
    header = " ".join(f"{n:>6}" for n in names)
    values = " ".join(f"{100 * metrics[n]:6.1f}" for n in names)
    return f"{header}\n{values}"
