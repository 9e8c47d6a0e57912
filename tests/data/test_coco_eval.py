"""COCO evaluation: perfect detections score 1, none score 0, coordinates map back to the original image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detector.data.coco_eval import METRIC_NAMES, evaluate_detections, format_metrics, to_coco_results
from detector.data.coco import build_dataset, coco_from_dict
from detector.data.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("eval") / "ds", 1, 10, seed=4, workers=1, large_every=5)
    cfg = OmegaConf.load(ROOT / "conf/data/synthetic.yaml")
    cfg.root, cfg.val_size, cfg.max_size = str(root), 160, 256  # scale != 1: exercises the mapping back
    return build_dataset(cfg, "val", train=False)


def _gt_as_detections(coco, score=1.0, shift=0.0):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [a["bbox"][0] + shift, *a["bbox"][1:]], "score": score}
        for a in coco.dataset["annotations"]
        if not a["iscrowd"]
    ]


def test_ground_truth_as_detections_scores_one(val_set, capsys):
    metrics = evaluate_detections(val_set.coco, _gt_as_detections(val_set.coco))
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_no_detections_scores_zero_without_crashing(val_set):
    metrics = evaluate_detections(val_set.coco, [])
    assert metrics == {name: 0.0 for name in METRIC_NAMES}


def test_shifted_detections_score_below_one(val_set):
    metrics = evaluate_detections(val_set.coco, _gt_as_detections(val_set.coco, shift=6.0))
    assert 0.0 < metrics["AP"] < 0.95


def test_metrics_without_ground_truth_are_zero_not_minus_one():
    image = {"id": 1, "file_name": "a.jpg", "width": 500, "height": 500}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 200], "area": 40000, "iscrowd": 0}
    coco = coco_from_dict({"images": [image], "annotations": [ann], "categories": [{"id": 1, "name": "x"}]})
    det = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 200], "score": 0.9}]
    metrics = evaluate_detections(coco, det)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APl"] == pytest.approx(1.0)
    assert metrics["APs"] == 0.0 and metrics["APm"] == 0.0 and metrics["ARs"] == 0.0  # pycocotools: -1


def test_model_outputs_map_back_to_original_pixels(val_set):
    outputs, targets = [], []
    for index in range(len(val_set)):
        _, target = val_set[index]
        assert target["scale"] != 1.0
        labels = target["labels"]
        outputs.append({"boxes": target["boxes"], "scores": torch.linspace(1.0, 0.5, len(labels)), "labels": labels})
        targets.append(target)
    results = to_coco_results(outputs, targets, val_set.label_to_cat_id)
    originals = {a["id"]: a for a in val_set.coco.dataset["annotations"]}
    assert len(results) == len(originals)
    expected = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in originals.values())
    got = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in results)
    for e, g in zip(expected, got):
        assert e[:2] == g[:2]
        assert g[2:] == pytest.approx(e[2:], abs=0.05)
    assert all(isinstance(r["score"], float) and isinstance(r["bbox"][0], float) for r in results)
    assert evaluate_detections(val_set.coco, results)["AP"] == pytest.approx(1.0)


def test_subset_of_images_is_evaluated_alone(val_set):
    first = val_set.image_ids[:3]
    dets = [d for d in _gt_as_detections(val_set.coco) if d["image_id"] in first]
    assert evaluate_detections(val_set.coco, dets, image_ids=first)["AP"] == pytest.approx(1.0)
    assert evaluate_detections(val_set.coco, dets)["AP"] < 1.0


def test_detections_on_unknown_images_are_refused(val_set):
    with pytest.raises(ValueError, match="image ids"):
        evaluate_detections(val_set.coco, [{"image_id": 9999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])


def test_format_metrics_lists_every_metric_in_percent():
    table = format_metrics({name: 0.5 for name in METRIC_NAMES})
    header, values = table.splitlines()
    assert header.split() == list(METRIC_NAMES) and values.split() == ["50.0"] * 12
