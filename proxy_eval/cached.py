"""One candidate -> one :class:`~proxy_eval.result.TrialResult`, trained on cached backbone features.

:class:`CachedEvaluator` implements the evaluator contract of the search loop::

    evaluate(arch, seed=0, report=None) -> TrialResult      # never raises

A trial builds only the decoder (FPN + head) of ``arch`` from the cached backbone's declared
shapes, trains it on proxy-train features for ``iters`` SGD iterations (momentum 0.9, linear
warmup from lr/3, cosine decay, gradient-norm clipping; bf16 autocast on GPU, fp32 on CPU;
features kept on the device), then evaluates it on proxy-val: the mean validation loss sum and
COCO box AP (pycocotools, against a ground truth built from the cached proxy-val boxes at proxy
resolution, so small / medium / large follow proxy-pixel areas). ``reward`` is ``ap`` (default)
or ``neg_loss`` = exp(-mean validation loss sum): the authors' reward (minus the loss) mapped
monotonically into (0, 1], so failures (reward 0) rank below every finished candidate. ``params`` and
``gflops`` are the decoder's, at the proxy resolution, batch 1 (``detector.commands.describe``
conventions: 2 x MACs, DCN counted as a dense conv). ``loss`` is the mean validation loss sum;
the last training loss is in ``extra["train_loss"]``. ``deform_impl`` picks the DCN kernel of the
trial's decoder (``detector.fast.deform_layer.set_deform_kernel``); nothing process-wide changes.

With ``train_last_stage`` (the cache must have been prepared with it) a trial also trains the
backbone's last stage: a fresh copy of the adapted ``layer4`` from the cache (the same start for
every trial) joins the decoder's parameters in the same optimizer (same lr, momentum, weight decay,
one gradient clip over both), and every training and validation batch uses C5 = layer4(cached C4)
instead of the cached C5; C3 and C4 stay the cached features (:mod:`proxy_eval.last_stage`).
``params`` and ``gflops`` remain the decoder's.

Failures are values: ``diverged`` (a non-finite training or validation loss), ``oom``
(``torch.OutOfMemoryError``), ``timeout`` (past ``timeout_s`` wall-clock seconds, checked every
iteration), ``error`` (anything else, message in ``error``). Fault injection for tests:
``fail_prob`` (probability, seeded by (seed, arch), of an injected error) and ``inject_nan``
(the training loss becomes NaN at that iteration).

``report`` (optional) receives ``{"iteration", "loss", "loss_window"}`` every ``report_every``
iterations and after the last (``loss``: that iteration's training loss, what the stopping rule reads;
``loss_window``: the mean over the iterations since the previous report, kept for the fidelity
studies). On CPU a trial is deterministic for a given seed: the decoder is initialised under
``torch.manual_seed(seed)`` (the caller's RNG state is restored) and batches are drawn from a
generator seeded with it.

The evaluator is picklable (only settings and the cache path travel; features are loaded lazily
once per process, checksum-verified, and kept for later trials).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.arch.grammar import Arch
from detector.arch.zoo import resolve_arch
from detector.fast.deform_layer import set_deform_kernel
from detector.model.backbone import ShapeSpec
from detector.model.build import build_decoder
from detector.model.cost import decoder_cost
from detector.model.recipe import Recipe
from proxy_eval.decoder_training import Report, place_split, predict_decoder, train_decoder
from proxy_eval.feature_cache import FeatureCache, ProxyFeatures, SplitFeatures
from proxy_eval.last_stage import LastStageError, build_last_stage
from proxy_eval.result import InjectedFailure, TrialResult, failed_trial, injected_failure, trial_reward
from proxy_eval.settings import TrialSettings, resolve_device


def proxy_val_coco(val: SplitFeatures, num_classes: int):
    """A pycocotools index of the proxy-val boxes in proxy pixels; category id = label + 1."""
    from detector.data.coco import coco_from_dict

    images, annotations = [], []
    for image_id, (height, width), boxes, labels in zip(val.image_ids, val.sizes, val.boxes, val.labels):
        images.append({"id": int(image_id), "width": int(width), "height": int(height), "file_name": ""})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


# ----------------------------------------------------------------------------- loaded features


_LOADED: dict[tuple[str, int, int], ProxyFeatures] = {}  # one per process: (path, size, mtime) -> features


def load_features(cache: FeatureCache | str | os.PathLike) -> ProxyFeatures:
    """The features of a cache folder, verified and read once per process (and file version)."""
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache(Path(cache).parent, Path(cache).name)
    stat = cache.tensor_file.stat()
    key = (str(cache.tensor_file), stat.st_size, stat.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = cache.load(verify=True, mmap=True)  # mmap: no second copy in RAM
    return _LOADED[key]


def score_detections(detections: list[list[dict[str, Tensor]]], val: SplitFeatures, coco_gt: Any,
                     num_classes: int) -> dict[str, float]:
    """COCO box metrics (pycocotools) of batched proxy-val detections against ``proxy_val_coco``."""
    from detector.data.coco_eval import evaluate_detections, to_coco_results

    flat = [d for batch in detections for d in batch]
    meta = [{"image_id": image_id, "scale": 1.0, "orig_size": size} for image_id, size in zip(val.image_ids, val.sizes)]
    results = to_coco_results(flat, meta, list(range(1, num_classes + 1)))
    return evaluate_detections(coco_gt, results)


# ----------------------------------------------------------------------------- the evaluator


class CachedEvaluator:
    """Trains and scores candidate decoders on a feature cache (see the module docstring)."""

    def __init__(self, cache: FeatureCache | str | os.PathLike, settings: TrialSettings, recipe: Recipe) -> None:
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(Path(cache).parent, Path(cache).name)
        self.cache_path = str(self.cache.path)
        self.settings = settings
        self.recipe = recipe if settings.score_thresh is None else replace(recipe, score_thresh=settings.score_thresh)
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}  # features are reloaded in the receiving process

    def _loaded(self) -> dict[str, Any]:
        if self._state is None:
            data = load_features(self.cache)
            device = torch.device(resolve_device(self.settings.device))
            self._state = {
                "data": data,
                "device": device,
                "train": place_split(data.train, device),
                "val": place_split(data.val, device),
                "shapes": {level: ShapeSpec(c, s) for level, (c, s) in data.shapes.items()},
                "coco": proxy_val_coco(data.val, data.num_classes),
            }
        return self._state

    def evaluate(self, arch: Arch | str, seed: int = 0, report: Report | None = None) -> TrialResult:
        """Train and score one candidate; every failure comes back as a result (see module doc)."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        try:
            if self.settings.threads:
                torch.set_num_threads(int(self.settings.threads))
            if isinstance(arch, str):
                arch = resolve_arch(arch, num_blocks=None, num_head_layers=None)
            if injected_failure(seed, arch, self.settings.fail_prob):
                raise InjectedFailure(f"injected failure (proxy_eval.fail_prob={self.settings.fail_prob})")
            state = self._loaded()
            data: ProxyFeatures = state["data"]
            device, num_classes = state["device"], data.num_classes
            metrics["params"], metrics["gflops"] = decoder_cost(arch, state["shapes"], num_classes, self.recipe,
                                                                self.settings.width, data.resolution)
            fpn, head = self._build(arch, state["shapes"], num_classes, seed, device)
            last_stage = self._last_stage(data, device)
            set_deform_kernel(fpn, self.settings.deform_impl)
            set_deform_kernel(head, self.settings.deform_impl)
            deadline = start + self.settings.timeout_s
            train_loss = train_decoder(fpn, head, state["train"], self.settings, self.recipe, num_classes, device,
                                       seed, report, deadline, last_stage)
            val_loss, detections = predict_decoder(fpn, head, state["val"], self.settings, self.recipe, num_classes,
                                                   device, deadline, last_stage)
            coco_metrics = score_detections(detections, data.val, state["coco"], num_classes)
        except Exception as err:  # evaluate never raises: a broken candidate is a result
            return failed_trial(err, time.perf_counter() - start, metrics)
        ap = coco_metrics["AP"]
        return TrialResult(status="ok", reward=trial_reward(self.settings.reward, ap, val_loss), ap=ap, ap50=coco_metrics["AP50"], loss=val_loss,
                           seconds=time.perf_counter() - start,
                           extra={"train_loss": train_loss, "AP75": coco_metrics["AP75"], "seed": seed},
                           **metrics)

    __call__ = evaluate

    def _build(self, arch: Arch, shapes: dict[str, ShapeSpec], num_classes: int, seed: int,
               device: torch.device) -> tuple[nn.Module, nn.Module]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fpn, head = build_decoder(arch, shapes, num_classes, self.recipe, self.settings.width)
        return fpn.to(device), head.to(device)

    def _last_stage(self, data: ProxyFeatures, device: torch.device) -> nn.Module | None:
        """A fresh copy of the cached adapted last stage with ``train_last_stage``, else None."""
        if not self.settings.train_last_stage:
            return None
        if data.last_stage is None:
            raise LastStageError(f"proxy_eval.train_last_stage=true but the feature cache {self.cache_path} holds "
                                 "no last stage; prepare it with proxy_eval.train_last_stage=true")
        return build_last_stage(data.last_stage, device)
