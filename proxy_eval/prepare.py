"""Prepare the proxy task: adapt the backbone, then cache its frozen features (progressive adaptation).

``python -m search prepare`` (or :func:`prepare` from the search driver, once before any trial):

1. **Splits.** Seeded proxy-train / proxy-val image lists from the *training* split only
   (:mod:`proxy_eval.splits`; sizes ``proxy_eval.train_images`` / ``val_images``).
2. **Proxy images.** Every proxy image is letterboxed to a fixed R x R input
   (R = ``proxy_eval.resolution``, a multiple of 32, like the authors' fixed 384 x 384 loaders):
   resized by ``R / max(h, w)`` (bilinear, antialiased), normalised as the backbone expects, then
   zero-padded at the bottom/right (padding after normalisation, as the detector pads). Boxes are
   scaled with the image; boxes thinner than ``min_box_size`` proxy pixels afterwards are dropped.
3. **Adaptation.** The plain ``fcos`` detector (zoo ``fcos``: standard FPN + FCOS head, decoder
   width ``proxy_eval.width``) with ``cfg.backbone`` is built (seeded), optionally loaded from a
   detection checkpoint (``proxy_eval.adapt_from``: a checkpoint of our detector, any state dict
   with ``backbone.*`` keys, or a torchvision ``fcos_resnet50_fpn`` state dict, converted with
   :func:`detector.model.convert.torchvision_fcos_to_ours`), then trained on proxy-train for
   ``adapt_iters`` SGD iterations at the proxy resolution (0 skips training). The backbone's
   frozen stages stay frozen, as in full training.
4. **Features.** The backbone is frozen and its levels (``cfg.backbone.levels``, C3-C5 by default)
   are computed once for every proxy image and stored in fp16 with the targets (boxes in proxy
   pixels, labels) and image ids: :class:`proxy_eval.feature_cache.FeatureCache`. With
   ``proxy_eval.train_last_stage`` (ResNets only, checked before adapting) the cache also stores
   the adapted weights of the last stage (``layer4``), which trials then train from
   (:mod:`proxy_eval.last_stage`).

The cache lives in ``<cache_dir>/features/<key>/`` (``cache_dir`` from the config, default
``detector.cache_dir.default_cache_dir()``). ``key`` hashes everything that determines the
features: the data identity (resolved root, annotation file path, size and mtime), the split ids,
the backbone (name, initial weights - a file's sha256 -, frozen stages, norm, levels), the
adaptation (checkpoint sha256, iterations, batch, lr, width, seed, recipe, classes), the resolution
and the transform, and ``last_stage: true`` when the last stage is stored (only then, so the key of
a cache without it is what it always was). A later run or a worker with the same settings reuses it; a cache whose
checksum fails is logged as a warning and rebuilt. Progress bars show adaptation and extraction.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from detector.cache_dir import resolve_cache_dir
from detector.engine.step import optimizer_step
from detector.model.recipe import Recipe
from detector.arch.zoo import zoo_arch
from proxy_eval.feature_cache import (
    CorruptCacheError,
    FeatureCache,
    ProxyFeatures,
    SplitFeatures,
    cache_key,
    file_sha256,
)
from proxy_eval.last_stage import check_supported, last_stage_payload
from proxy_eval.splits import ProxySplits, make_splits
from proxy_eval.decoder_training import autocast_context, decoder_losses, lr_at
from proxy_eval.settings import BackboneSpec, PrepareError, PrepareSettings, prepare_arguments

log = logging.getLogger(__name__)

TRANSFORM = "letterbox-bilinear-antialias-pad-bottom-right-v1"  # part of the cache key
FEATURES_DIR = "features"


# ----------------------------------------------------------------------------- proxy images


def letterbox(image: Tensor, boxes: Tensor, resolution: int) -> tuple[Tensor, Tensor, float]:
    """Resize (3, h, w) so its long side is ``resolution``; boxes (K, 4) xyxy scaled along.

    Returns the resized image (3, h', w') (not padded), its boxes clipped to it, and the scale.
    """
    height, width = image.shape[-2:]
    scale = resolution / max(height, width)
    new_h, new_w = max(1, min(resolution, round(height * scale))), max(1, min(resolution, round(width * scale)))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                            antialias=True)[0]  # (3, h', w')
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
    return resized.clamp_(0, 1), boxes, scale


class ProxyImages(Dataset):
    """The proxy images of one split, letterboxed: ``(image (3, h', w'), {boxes, labels, image_id})``."""

    def __init__(self, dataset: Any, image_ids: Sequence[int], resolution: int, min_box_size: float) -> None:
        index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
        self.dataset, self.indices = dataset, [index_of[int(i)] for i in image_ids]
        self.resolution, self.min_box_size = resolution, min_box_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[self.indices[k]]  # native size: the dataset has no transform
        resized, boxes, _ = letterbox(image, target["boxes"], self.resolution)
        wide = ((boxes[:, 2:] - boxes[:, :2]) >= self.min_box_size).all(dim=1)  # (K,)
        return resized, {"boxes": boxes[wide], "labels": target["labels"][wide], "image_id": target["image_id"]}


def _collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def normalised_batch(images: list[Tensor], detector: Any, resolution: int, device: torch.device) -> Tensor:
    """Normalise each (3, h, w) image as the backbone expects, zero-pad into (N, 3, R, R)."""
    batch = torch.zeros(len(images), 3, resolution, resolution, device=device)
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        batch[k, :, :h, :w] = detector.normalize(image.to(device))
    return batch


# ----------------------------------------------------------------------------- adaptation


def load_detection_checkpoint(detector: Any, path: str) -> None:
    """Load the backbone (and whatever else fits) of a detection checkpoint into ``detector``.

    Accepts a checkpoint dict holding ``model``/``state_dict``, a bare state dict, or a torchvision
    FCOS state dict. Every backbone parameter must be present with the right shape (PrepareError).
    """
    from detector.model.convert import torchvision_fcos_to_ours

    if not os.path.isfile(path):
        raise PrepareError(f"proxy_eval.adapt_from='{path}' is not a file; pass a detection checkpoint or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise PrepareError(f"proxy_eval.adapt_from: cannot read '{path}' ({type(err).__name__}: {err})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PrepareError(f"proxy_eval.adapt_from: '{path}' holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.body.") for k in state):
        state = torchvision_fcos_to_ours(state)
    own = detector.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k.startswith("backbone.") and k not in fitting
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise PrepareError(f"proxy_eval.adapt_from: '{path}' lacks {len(missing)} backbone tensors of "
                           f"{detector.backbone.__class__.__name__} (e.g. '{missing[0]}'); is it a checkpoint "
                           "with the same backbone (cfg.backbone)?")
    detector.load_state_dict(fitting, strict=False)
    log.info("adapt_from: loaded %d of %d tensors from %s", len(fitting), len(own), path)


def adapt(detector: Any, images: ProxyImages, settings: PrepareSettings, num_classes: int,
          device: torch.device, seed: int) -> list[float]:
    """Train ``detector`` on the proxy-train images for ``adapt_iters`` SGD iterations; the losses."""
    from detector.progress import progress

    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(images, replacement=True, num_samples=settings.adapt_iters * settings.adapt_batch_size,
                            generator=generator)
    loader = DataLoader(images, batch_size=settings.adapt_batch_size, sampler=sampler, collate_fn=_collate,
                        num_workers=settings.workers)
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.adapt_lr, momentum=0.9, weight_decay=1e-4)
    warmup = min(50, settings.adapt_iters // 3)
    detector.train()
    losses = []
    for iteration, (batch_images, targets) in enumerate(progress(loader, settings.adapt_iters, "adapt backbone")):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(iteration, settings.adapt_iters, warmup, settings.adapt_lr)
        padded = normalised_batch(batch_images, detector, settings.resolution, device)  # (B, 3, R, R)
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        with autocast_context(device, "auto"):
            features = detector.backbone(padded)
            loss = decoder_losses(detector.fpn, detector.head, features, targets, detector.recipe, num_classes)
        if not torch.isfinite(loss):
            raise PrepareError(f"adaptation diverged at iteration {iteration} (loss {loss.item()}); lower "
                               "proxy_eval.adapt_lr")
        optimizer_step(loss, optimizer, params, 10.0)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def extract(detector: Any, images: ProxyImages, settings: PrepareSettings, device: torch.device,
            desc: str) -> SplitFeatures:
    """Frozen backbone features (fp16, on the CPU) and targets of every image of ``images``."""
    from detector.progress import progress

    detector.eval()
    loader = DataLoader(images, batch_size=settings.extract_batch_size, shuffle=False, collate_fn=_collate,
                        num_workers=settings.workers)
    chunks: dict[str, list[Tensor]] = {}
    boxes, labels, image_ids, sizes = [], [], [], []
    for batch_images, targets in progress(loader, len(loader), desc):
        padded = normalised_batch(batch_images, detector, settings.resolution, device)  # (B, 3, R, R)
        for level, feature in detector.backbone(padded).items():
            chunks.setdefault(level, []).append(feature.to("cpu", torch.float16))  # (B, C_l, R/s, R/s)
        for image, target in zip(batch_images, targets):
            boxes.append(target["boxes"].float())
            labels.append(target["labels"].long())
            image_ids.append(int(target["image_id"]))
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
    features = {level: torch.cat(parts) for level, parts in chunks.items()}
    return SplitFeatures(features=features, boxes=boxes, labels=labels, image_ids=image_ids, sizes=sizes)


# ----------------------------------------------------------------------------- the cache


def _weights_identity(weights: str | None) -> str:
    weights = "none" if weights is None else str(weights)
    if weights in ("none", "imagenet"):
        return weights
    path = Path(weights).expanduser()
    return f"sha256:{file_sha256(path)}" if path.is_file() else weights


def key_material(settings: PrepareSettings, backbone: BackboneSpec, recipe: Recipe, num_classes: int,
                 ann_file: Path, splits: ProxySplits) -> dict[str, Any]:
    """Everything that determines the cached features, JSON-ready (hashed into the cache key)."""
    stat = ann_file.stat()
    adapt_from = settings.adapt_from
    adapt = {"iters": settings.adapt_iters}
    if settings.adapt_iters > 0 or adapt_from:
        adapt |= {"from": _weights_identity(adapt_from) if adapt_from else None,
                  "batch_size": settings.adapt_batch_size, "lr": settings.adapt_lr, "width": settings.width,
                  "seed": settings.split_seed, "recipe": asdict(recipe), "num_classes": num_classes}
    return {
        "data": {"ann_file": str(ann_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "splits": {"seed": splits.seed, "train": list(splits.train_ids), "val": list(splits.val_ids)},
        "backbone": {**asdict(backbone), "levels": list(backbone.levels),
                     "weights": _weights_identity(backbone.weights)},
        "adapt": adapt,
        "resolution": settings.resolution,
        "transform": TRANSFORM,
        "min_box_size": settings.min_box_size,
        **({"last_stage": True} if settings.train_last_stage else {}),
    }


def _build_adapted_detector(settings: PrepareSettings, backbone: BackboneSpec, recipe: Recipe, num_classes: int,
                            dataset: Any, splits: ProxySplits, device: torch.device) -> tuple[Any, list[float]]:
    from detector.model.build import build_detector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.split_seed)
        detector = build_detector(zoo_arch("fcos"), num_classes, recipe, backbone.name, backbone.weights or "none",
                                  width=settings.width, frozen_stages=backbone.frozen_stages,
                                  levels=backbone.levels, norm=backbone.norm)
    if settings.adapt_from:
        load_detection_checkpoint(detector, settings.adapt_from)
    detector.to(device)
    losses: list[float] = []
    if settings.adapt_iters > 0:
        train_images = ProxyImages(dataset, splits.train_ids, settings.resolution, settings.min_box_size)
        losses = adapt(detector, train_images, settings, num_classes, device, settings.split_seed)
    detector.eval().requires_grad_(False)
    return detector, losses


def prepare_features(settings: PrepareSettings, data_cfg: Mapping[str, Any] | Any, backbone: BackboneSpec,
                     recipe: Recipe, num_classes: int, cache_dir: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> FeatureCache:
    """Return a valid feature cache for these settings, adapting and extracting only when needed."""
    from detector.data.coco import CocoDetection, resolve_data_root, split_paths

    if settings.train_last_stage:  # before any work: a clear error for unsupported backbones
        check_supported(backbone.name, backbone.levels, backbone.frozen_stages)
    root = resolve_data_root(data_cfg, cache_dir)  # generates the synthetic set on first use
    image_dir, ann_file = split_paths(data_cfg, root, "train")  # the proxy never reads the val split
    dataset = CocoDetection(image_dir, ann_file, transform=None)
    if dataset.num_classes != num_classes:
        raise PrepareError(f"data.num_classes={num_classes} but {ann_file.name} has {dataset.num_classes} "
                           f"categories; pass data.num_classes={dataset.num_classes}")
    splits = make_splits(dataset.image_ids, settings.train_images, settings.val_images, settings.split_seed)
    material = key_material(settings, backbone, recipe, num_classes, ann_file, splits)
    cache = FeatureCache(resolve_cache_dir(cache_dir) / FEATURES_DIR, cache_key(material))
    if cache.exists():
        try:
            cache.verify()
            log.info("proxy features: reusing %s", cache.path)
            return cache
        except CorruptCacheError as err:
            log.warning("proxy features: %s; rebuilding the cache", err)

    device = torch.device(device)
    start = time.perf_counter()
    detector, losses = _build_adapted_detector(settings, backbone, recipe, num_classes, dataset, splits, device)
    adapt_seconds = time.perf_counter() - start
    parts = {}
    for split, ids in (("train", splits.train_ids), ("val", splits.val_ids)):
        images = ProxyImages(dataset, ids, settings.resolution, settings.min_box_size)
        parts[split] = extract(detector, images, settings, device, f"features proxy-{split}")
    shapes = {level: (spec.channels, spec.stride) for level, spec in detector.backbone.output_shapes().items()}
    last_stage = (last_stage_payload(detector.backbone, backbone.name, backbone.norm)
                  if settings.train_last_stage else None)
    features = ProxyFeatures(train=parts["train"], val=parts["val"], shapes=shapes,
                             resolution=settings.resolution, num_classes=num_classes, last_stage=last_stage)
    backbone_state = detector.backbone.state_dict()
    meta = {
        "material": material,
        "num_train": len(splits.train_ids),
        "num_val": len(splits.val_ids),
        "adapt_losses": {"first": losses[:1], "last": losses[-1:]},
        "adapt_seconds": round(adapt_seconds, 2),
        "extract_seconds": round(time.perf_counter() - start - adapt_seconds, 2),
        "device": str(device),
        "torch": torch.__version__,
        "backbone_params": sum(t.numel() for t in backbone_state.values()),
        "last_stage_params": sum(t.numel() for t in last_stage["state"].values()) if last_stage else 0,
    }
    cache.write(features, meta)
    log.info("proxy features: wrote %s (%d train / %d val images at %d px)", cache.path,
             len(splits.train_ids), len(splits.val_ids), settings.resolution)
    return cache


def prepare(cfg: Any) -> FeatureCache:
    """Adapt + cache for the composed search config (the driver calls this once before trials)."""
    return prepare_features(**prepare_arguments(cfg))


def prepare_command(cfg: Any) -> FeatureCache:
    """``python -m search prepare``: build (or reuse) the feature cache and print where it is."""
    start = time.perf_counter()
    cache = prepare(cfg)
    meta = cache.meta()
    print(f"proxy features: {cache.path}")
    print(f"  {meta.get('num_train', '?')} proxy-train / {meta.get('num_val', '?')} proxy-val images, "
          f"{meta.get('material', {}).get('resolution', '?')} px; ready in {time.perf_counter() - start:.1f} s")
    return cache
