"""``python -m detector check-export onnx=<file> ckpt=<file>``: does the exported detector still detect the same?

The exported file runs in ONNX Runtime on the CPU (``export.runtime=reference``: the ONNX reference
evaluator, which also runs ``dcn=native``) and the PyTorch model on the CPU, on the same images of the
val split of the configured data (``experiment=`` / ``data.*``, as for ``eval``; ``export.max_images``
limits them). Both sides get the same padded batches and the same post-processing, so what is compared
is what the export changed. Checked, with the verdict on one line and the details in
``<onnx file>.check.json``:

- head maps: the largest absolute difference of any output map (reported);
- detections: per image, every PyTorch detection has a runtime detection of the same label with every
  box coordinate within ``export.box_atol`` pixels and the score within ``export.score_atol``, and
  vice versa. The one tolerated exception is the cut at ``detections_per_image``: a detection whose
  score is within ``score_atol`` of the image's lowest kept score may be swapped for its neighbour;
- COCO AP (pycocotools, the 12 metrics) of both detection sets: AP equal to 3 decimals (``|dAP| < 5e-4``).

The model comes from ``ckpt=`` or, for an export of random weights, from the same ``arch=`` and
``seed`` as the export (:func:`detector.deploy.onnx_export.model_for_export`). A failed check exits with
code 2 and says which criterion failed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.errors import UserError
from detector.deploy.onnx_export import ExportError, model_for_export
from detector.deploy.onnx_runtime import OnnxDetector
from detector.model.postprocess import postprocess

AP_DECIMALS_TOL = 5e-4


class ParityError(UserError):
    """The exported model does not reproduce the PyTorch model within the stated tolerances."""


def match_detections(ours: dict[str, Tensor], theirs: dict[str, Tensor], box_atol: float, score_atol: float,
                     cut: int) -> dict[str, Any]:
    """Match one image's detections both ways; returns counts and the largest differences.

    ``unmatched``: detections without a partner within the tolerances, not counting those at the
    ``cut`` (``detections_per_image`` reached and the score within ``score_atol`` of the lowest kept).
    """
    used: set[int] = set()
    box_diff = score_diff = 0.0
    unmatched = 0
    for index in range(len(ours["scores"])):
        best, best_diff = None, None
        for other in range(len(theirs["scores"])):
            if other in used or int(theirs["labels"][other]) != int(ours["labels"][index]):
                continue
            d_score = abs(float(theirs["scores"][other]) - float(ours["scores"][index]))
            d_box = float((theirs["boxes"][other] - ours["boxes"][index]).abs().max())
            if d_score <= score_atol and d_box <= box_atol and (best_diff is None or d_box < best_diff):
                best, best_diff = other, d_box
        if best is None:
            unmatched += not _at_cut(ours, index, score_atol, cut)
            continue
        used.add(best)
        box_diff = max(box_diff, best_diff)
        score_diff = max(score_diff, abs(float(theirs["scores"][best]) - float(ours["scores"][index])))
    unmatched += sum(not _at_cut(theirs, other, score_atol, cut) for other in range(len(theirs["scores"]))
                     if other not in used)
    return {"detections": len(ours["scores"]), "matched": len(used), "unmatched": unmatched,
            "max_box_diff": box_diff, "max_score_diff": score_diff}


def _at_cut(dets: dict[str, Tensor], index: int, score_atol: float, cut: int) -> bool:
    scores = dets["scores"]
    return len(scores) >= cut and float(scores[index]) <= float(scores.min()) + score_atol


@torch.no_grad()
def compare(model: nn.Module, runtime: OnnxDetector, loader: Any, label_to_cat_id: list[int], coco: Any,
            box_atol: float, score_atol: float) -> dict[str, Any]:
    """Run both sides over ``loader``; the comparison record (see the module doc)."""
    from detector.data.coco_eval import evaluate_detections, to_coco_results

    totals = {"images": 0, "detections": 0, "matched": 0, "unmatched": 0, "max_box_diff": 0.0,
              "max_score_diff": 0.0, "max_head_diff": 0.0}
    results: dict[str, list[dict]] = {"pytorch": [], "onnx": []}
    image_ids: list[int] = []
    cut = model.recipe.detections_per_image
    for images, targets in loader:
        padded, sizes = model.preprocess(images)
        ours_maps = model.head(model.forward_features(padded))
        theirs_maps = runtime.head_maps(padded)
        totals["max_head_diff"] = max(totals["max_head_diff"], max(
            float((a - b).abs().max()) for key in ours_maps for a, b in zip(ours_maps[key], theirs_maps[key])))
        ours = postprocess(ours_maps, model.points(ours_maps["cls_logits"]), sizes, model.recipe)
        theirs = postprocess(theirs_maps, model.points(theirs_maps["cls_logits"]), sizes, runtime.recipe)
        for a, b in zip(ours, theirs):
            found = match_detections(a, b, box_atol, score_atol, cut)
            totals["images"] += 1
            for key in ("detections", "matched", "unmatched"):
                totals[key] += found[key]
            for key in ("max_box_diff", "max_score_diff"):
                totals[key] = max(totals[key], found[key])
        results["pytorch"] += to_coco_results(ours, targets, label_to_cat_id)
        results["onnx"] += to_coco_results(theirs, targets, label_to_cat_id)
        image_ids += [int(t["image_id"]) for t in targets]
    metrics = {side: evaluate_detections(coco, dets, image_ids=image_ids) for side, dets in results.items()}
    return {**totals, "ap_pytorch": metrics["pytorch"]["AP"], "ap_onnx": metrics["onnx"]["AP"],
            "metrics_pytorch": metrics["pytorch"], "metrics_onnx": metrics["onnx"]}


def verdict(record: dict[str, Any]) -> list[str]:
    """The failed criteria of a comparison record (empty: the check passed)."""
    failed = []
    if record["unmatched"]:
        failed.append(f"{record['unmatched']} detection(s) without a partner within box_atol={record['box_atol']} px "
                      f"and score_atol={record['score_atol']}")
    if abs(record["ap_pytorch"] - record["ap_onnx"]) >= AP_DECIMALS_TOL:
        failed.append(f"AP differs beyond 3 decimals ({record['ap_pytorch']:.4f} vs {record['ap_onnx']:.4f})")
    return failed


def run_check(cfg: Any, onnx_path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Compare ``onnx_path`` with ``model`` on the val split; writes ``<file>.check.json``, raises on failure."""
    from torch.utils.data import DataLoader, Subset

    from detector.data.coco import build_dataset
    from detector.data.transforms import collate

    onnx_path = Path(onnx_path)
    settings = cfg.export
    if int(cfg.data.num_classes) != int(model.num_classes):
        raise ExportError(f"the model predicts {model.num_classes} classes but data.num_classes={cfg.data.num_classes}; "
                          "pass the data config it was trained with (e.g. the same experiment=)")
    runtime = OnnxDetector(onnx_path, str(settings.get("runtime", "onnxruntime")))
    dataset = build_dataset(cfg.data, "val", train=False, cache_dir=cfg.get("cache_dir", None))
    count = len(dataset) if settings.get("max_images", None) is None else min(len(dataset), int(settings.max_images))
    loader = DataLoader(Subset(dataset, list(range(count))), batch_size=int(settings.batch), shuffle=False,
                        collate_fn=collate)
    box_atol, score_atol = float(settings.box_atol), float(settings.score_atol)
    record = compare(model.eval(), runtime, loader, dataset.label_to_cat_id, dataset.coco, box_atol, score_atol)
    record.update({"onnx": str(onnx_path), "arch": runtime.meta["arch"], "dcn": runtime.meta["dcn"],
                   "runtime": runtime.runtime, "box_atol": box_atol, "score_atol": score_atol,
                   "ap_tolerance": AP_DECIMALS_TOL})
    failed = verdict(record)
    record["passed"] = not failed
    report = onnx_path.with_name(onnx_path.name + ".check.json")
    report.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"parity {runtime.runtime} vs PyTorch on {record['images']} val images: {record['matched']}/"
          f"{record['detections']} detections matched (max box diff {record['max_box_diff']:.2e} px, max score diff "
          f"{record['max_score_diff']:.2e}, max head-map diff {record['max_head_diff']:.2e}); AP "
          f"{record['ap_pytorch']:.4f} (PyTorch) vs {record['ap_onnx']:.4f} ({runtime.runtime}) -> "
          f"{'PASS' if not failed else 'FAIL'}; details in {report}")
    if failed:
        raise ParityError(f"parity check of {onnx_path} failed: {'; '.join(failed)}")
    return record


def check_export_command(cfg: Any) -> dict[str, Any]:
    """``python -m detector check-export onnx=<file> (ckpt=<file> | arch=<code> [seed=])``."""
    path = cfg.get("onnx", None)
    if path is None or not str(path).strip():
        raise ExportError("onnx is not set; pass onnx=<file written by python -m detector export>")
    model, arch, _ = model_for_export(cfg)
    runtime_arch = OnnxDetector.read_arch(Path(str(path)).expanduser())
    if runtime_arch != arch:
        raise ExportError(f"onnx={path} holds arch '{runtime_arch}' but the model to compare is '{arch}'; pass the "
                          "ckpt= (or arch= and seed=) it was exported from")
    return run_check(cfg, Path(str(path)).expanduser(), model)
