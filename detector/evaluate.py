"""COCO evaluation of a detector: during training, and ``python -m detector eval``.

- :func:`evaluate` runs a model over a loader of a COCO-format split and scores the detections
  with pycocotools (``detector.coco_eval``): the 12 metrics AP, AP50, AP75, APs, APm, APl, AR1,
  AR10, AR100, ARs, ARm, ARl, in [0, 1]. Under torch.distributed each process runs its own shard
  (:func:`eval_loader`) and the detections are gathered, so every process returns the same result.
- :func:`model_from_checkpoint` rebuilds the detector a checkpoint was trained as (architecture,
  backbone, recipe, width and classes all come from the checkpoint) and loads its weights.
- ``python -m detector eval ckpt=<file> [arch=<code>] [experiment=... data...]`` evaluates on the
  val split of the configured data (the same ``experiment=`` / ``data`` overrides as training),
  prints the metrics and writes ``eval_metrics.json`` and ``eval_detections.json`` into ``out=``
  (default: the checkpoint's folder). ``arch=`` is optional; when given it must match the
  checkpoint's code.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from detector.checkpoint import CheckpointError, check_arch, load_checkpoint
from detector.coco_eval import METRIC_NAMES, evaluate_detections, format_metrics, to_coco_results
from detector.data.coco import CocoDetection, build_dataset
from detector.data.transforms import collate
from detector.distributed import Context, autocast_dtype, broadcast_object, gather_objects, setup, teardown
from detector.errors import UserError
from detector.run_dir import ensure_writable, write_json
from detector.zoo import resolve_arch

log = logging.getLogger(__name__)

EVAL_METRICS_FILE = "eval_metrics.json"
EVAL_DETECTIONS_FILE = "eval_detections.json"


def _base_dataset(dataset: Dataset) -> CocoDetection:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise TypeError(f"evaluation needs a CocoDetection dataset (or a Subset of one), got {type(dataset).__name__}")
    return dataset


def eval_loader(dataset: CocoDetection, batch_size: int, workers: int, ctx: Context | None = None,
                max_images: int | None = None) -> DataLoader:
    """In-order loader over this process's shard (every ``world_size``-th image) of the first ``max_images``."""
    count = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    shard = Subset(dataset, list(range(rank, count, world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, ctx: Context | None = None,
             amp_dtype: torch.dtype | None = None, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics and COCO-format detections (original image pixels) of ``model`` on ``loader``.

    ``model``: an FCOS in any mode (put in eval mode here, restored after); ``loader`` yields
    ``(images, targets)`` of a :class:`CocoDetection` (or a Subset of one). Under
    torch.distributed (``ctx.distributed``) every process passes its shard and gets the metrics
    of all shards together.
    """
    dataset = _base_dataset(loader.dataset)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    detections: list[dict] = []
    image_ids: list[int] = []
    show = progress and (ctx is None or ctx.is_main)
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not show, leave=False, dynamic_ncols=True):
            images = [image.to(device, non_blocking=True) for image in images]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images)
            detections += to_coco_results(outputs, targets, dataset.label_to_cat_id)
            image_ids += [int(t["image_id"]) for t in targets]
    finally:
        model.train(was_training)
    if ctx is None or not ctx.distributed:
        return evaluate_detections(dataset.coco, detections, image_ids=image_ids), detections
    detections = [d for part in gather_objects(detections, ctx) for d in part]
    image_ids = [i for part in gather_objects(image_ids, ctx) for i in part]
    metrics = evaluate_detections(dataset.coco, detections, image_ids=image_ids) if ctx.is_main else None
    return broadcast_object(metrics, ctx), detections  # scored once, on rank 0


def model_from_checkpoint(payload: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The checkpoint's detector (built from its own arch and config) with its weights, in eval mode."""
    from detector.backbone import resolve_freezing
    from detector.build import build_detector_from_cfg

    cfg = OmegaConf.create(payload["config"])
    # the checkpoint holds every weight; never download (but keep the freezing its weights implied)
    cfg.backbone.frozen_stages, cfg.backbone.norm = resolve_freezing(
        cfg.backbone.weights, cfg.backbone.frozen_stages, cfg.backbone.norm)
    cfg.backbone.weights = "none"
    arch = resolve_arch(str(payload["arch"]))
    model = build_detector_from_cfg(cfg, arch)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit arch '{payload['arch']}': missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}; was it written by another version?")
    return model.to(device).eval()


def typed_override(key: str, argv: Sequence[str] | None = None) -> str | None:
    """The value of ``key=...`` as typed on the command line (``+key=`` / ``++key=`` too), else None.

    eval and infer take the architecture from the checkpoint; an ``arch=`` the user typed is
    checked against it, while the config's default ``arch`` is not.
    """
    argv = sys.argv[1:] if argv is None else argv
    for item in argv:
        name, sep, value = item.lstrip("+").partition("=")
        if sep and name == key:
            return value
    return None


def _require(cfg: Any, key: str, hint: str) -> str:
    value = cfg.get(key, None)
    if value is None or not str(value).strip():
        raise UserError(f"{key} is not set; {hint}")
    return str(value)


def checked_checkpoint(cfg: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Load ``cfg.ckpt``; refuse it when a typed ``arch=`` names another code."""
    ckpt = _require(cfg, "ckpt", "pass ckpt=<run dir>/last.pt (or final.pt)")
    payload = load_checkpoint(ckpt)
    typed = typed_override("arch", argv)
    if typed is not None:
        check_arch(payload, str(resolve_arch(typed)), source=f"checkpoint {ckpt}")
    return payload


def eval_command(cfg: Any) -> dict[str, float]:
    """``python -m detector eval ckpt=<file>``: COCO metrics of a checkpoint on the val split."""
    payload = checked_checkpoint(cfg)
    ctx = setup(str(cfg.device))
    trained_classes = int(payload["config"]["data"]["num_classes"])
    if int(cfg.data.num_classes) != trained_classes:
        raise UserError(f"the checkpoint predicts {trained_classes} classes but data.num_classes="
                        f"{cfg.data.num_classes}; pass the data config it was trained with (e.g. the same experiment=)")
    model = model_from_checkpoint(payload, ctx.device)
    dataset = build_dataset(cfg.data, "val", train=False, cache_dir=cfg.get("cache_dir", None))
    batch = int(cfg.train.get("eval_batch_size", None) or cfg.train.batch_size)
    max_images = cfg.train.get("max_eval_images", None)
    loader = eval_loader(dataset, batch, int(cfg.train.workers), ctx, max_images)
    amp = autocast_dtype(str(cfg.train.amp), ctx.device)
    try:
        metrics, detections = evaluate(model, loader, ctx, amp, progress=True)
    finally:
        teardown(ctx)
    if not ctx.is_main:
        return metrics
    out_dir = Path(str(cfg.out)).expanduser() if cfg.get("out", None) else Path(str(cfg.ckpt)).expanduser().parent
    ensure_writable(out_dir, "out")
    write_json(out_dir / EVAL_DETECTIONS_FILE, detections)
    record = {"arch": str(payload["arch"]), "ckpt": str(cfg.ckpt), "iteration": int(payload["iteration"]),
              "images": len(dataset) if max_images is None else min(len(dataset), int(max_images)), **{name: metrics[name] for name in METRIC_NAMES}}
    write_json(out_dir / EVAL_METRICS_FILE, record)
    print(format_metrics(metrics))
    print(f"wrote {out_dir / EVAL_METRICS_FILE} and {out_dir / EVAL_DETECTIONS_FILE}")
    return metrics
