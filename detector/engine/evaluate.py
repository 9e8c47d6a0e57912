"""COCO evaluation of a detector: during training, and for ``python -m detector eval``
(:mod:`detector.commands.eval`, which owns the command line).

- :func:`evaluate` runs a model over a loader of a COCO-format split and scores the detections
  with pycocotools (``detector.data.coco_eval``): the 12 metrics AP, AP50, AP75, APs, APm, APl, AR1,
  AR10, AR100, ARs, ARm, ARl, in [0, 1]. Under torch.distributed each process runs its own shard
  (:func:`eval_loader`) and the detections are gathered, so every process returns the same result.
- :func:`model_from_checkpoint` rebuilds the detector a checkpoint was trained as (architecture,
  backbone, recipe, width and classes all come from the checkpoint) and loads its weights.
- ``python -m detector eval ckpt=<file> [arch=<code>] [experiment=... data...]`` evaluates on the
  val split of the configured data (the same ``experiment=`` / ``data`` overrides as training),
  prints the metrics and writes ``eval_metrics.json`` and ``eval_detections.json`` into ``out=``
  (default: the checkpoint's folder). Like ``infer``, it never overwrites: when ``out`` already
  holds those files (an earlier eval) it refuses before evaluating; pass another ``out=``. ``arch=`` is optional; when given it must match the
  checkpoint's code.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from detector.engine.checkpoint import CheckpointError
from detector.data.coco_eval import evaluate_detections, to_coco_results
from detector.data.coco import CocoDetection
from detector.data.transforms import collate
from detector.engine.distributed import Context, broadcast_object, gather_objects
from detector.arch.zoo import resolve_arch
from detector.fast.deform_layer import set_deform_kernel

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
    """The checkpoint's detector (built from its own arch and config) with its weights, in eval mode,
    its DCNs on the ``auto`` kernel (:mod:`detector.fast.deform_layer`)."""
    from detector.model.backbone import resolve_freezing
    from detector.model.build import build_detector_from_cfg

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
    set_deform_kernel(model, "auto")  # the fast DCN kernel where it pays (CUDA / bf16), torchvision elsewhere
    return model.to(device).eval()


