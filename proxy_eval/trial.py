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

``report`` (optional) receives ``{"iteration", "loss"}`` every ``report_every`` iterations and
after the last. On CPU a trial is deterministic for a given seed: the decoder is initialised
under ``torch.manual_seed(seed)`` (the caller's RNG state is restored) and batches are drawn from
a generator seeded with it.

The evaluator is picklable (only settings and the cache path travel; features are loaded lazily
once per process, checksum-verified, and kept for later trials).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from detector.arch.grammar import Arch
from detector.model.backbone import ShapeSpec
from detector.model.build import build_decoder
from detector.fast.deform_layer import set_deform_kernel
from detector.model.deform import DEFORM_IMPLS
from detector.model.loss import compute_losses
from detector.model.points import points_for
from detector.model.postprocess import postprocess
from detector.model.recipe import Recipe
from detector.arch.zoo import resolve_arch
from proxy_eval.feature_cache import FeatureCache, ProxyFeatures, SplitFeatures
from proxy_eval.last_stage import LastStageError, build_last_stage, with_last_stage
from proxy_eval.result import TrialResult

REWARDS = ("ap", "neg_loss")
AMP_MODES = ("auto", "bf16", "off")
Report = Callable[[dict], None]


class TrialDiverged(Exception):
    """A non-finite training or validation loss (-> status ``diverged``)."""


class TrialTimeout(Exception):
    """Past ``timeout_s`` of wall clock (-> status ``timeout``)."""


class InjectedFailure(RuntimeError):
    """Raised inside a trial by ``fail_prob`` fault injection (becomes status ``error``)."""


@dataclass(frozen=True)
class TrialSettings:
    """Training and evaluation settings of one trial (read from ``cfg.proxy_eval`` by ``proxy_eval.build``)."""

    iters: int = 60
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 10
    clip_grad: float = 10.0
    width: int = 64
    amp: str = "auto"
    eval_batch_size: int = 16
    score_thresh: float | None = None  # None: the recipe's
    reward: str = "ap"
    timeout_s: float = 600.0
    report_every: int = 10
    fail_prob: float = 0.0
    inject_nan: int | None = None
    device: str = "cpu"
    threads: int | None = None
    deform_impl: str = "fast"
    train_last_stage: bool = False

    def __post_init__(self) -> None:
        from detector.errors import UserError

        if self.reward not in REWARDS:
            raise UserError(f"reward={self.reward}: choose one of {', '.join(REWARDS)}")
        if self.amp not in AMP_MODES:
            raise UserError(f"proxy_eval.amp={self.amp}: choose one of {', '.join(AMP_MODES)}")
        if self.iters < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("proxy_eval: iters, batch_size and eval_batch_size must be >= 1")
        if not 0.0 <= self.fail_prob <= 1.0:
            raise UserError(f"proxy_eval.fail_prob={self.fail_prob}: a probability in [0, 1]")
        if self.timeout_s <= 0:
            raise UserError(f"proxy_eval.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.deform_impl not in DEFORM_IMPLS:
            raise UserError(f"proxy_eval.deform_impl={self.deform_impl}: choose one of {', '.join(DEFORM_IMPLS)}")


# ----------------------------------------------------------------------------- shared training pieces


def lr_at(iteration: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warmup from base_lr / 3 over ``warmup`` iterations, then cosine decay to base_lr / 100."""
    if iteration < warmup:
        return base_lr * (1 / 3 + (2 / 3) * iteration / warmup)
    progress = (iteration - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``auto``/``bf16``; nothing on CPU or with ``off``."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def decoder_losses(fpn: nn.Module, head: nn.Module, features: dict[str, Tensor], targets: list[dict[str, Tensor]],
                   recipe: Recipe, num_classes: int) -> Tensor:
    """Sum of the FCOS losses of a decoder on backbone features ``{level: (B, C_l, H_l, W_l)}``."""
    head_out = head(fpn(features))
    points = points_for(head_out["cls_logits"], recipe.point_offset)
    return sum(compute_losses(head_out, points, targets, recipe, num_classes).values())


def failed_trial(err: Exception, seconds: float, metrics: dict[str, Any]) -> TrialResult:
    """The result of a trial that raised ``err``: diverged, timeout, oom (the CUDA cache is emptied),
    or error with the exception's type and message. ``metrics`` (params, gflops) are kept."""
    if isinstance(err, TrialDiverged):
        return TrialResult.failure("diverged", str(err), seconds, **metrics)
    if isinstance(err, TrialTimeout):
        return TrialResult.failure("timeout", str(err), seconds, **metrics)
    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return TrialResult.failure("oom", str(err).splitlines()[0] if str(err) else "out of memory", seconds, **metrics)
    return TrialResult.failure("error", f"{type(err).__name__}: {err}", seconds, **metrics)


def trial_reward(reward: str, ap: float, val_loss: float) -> float:
    """``ap``: the proxy-val AP; ``neg_loss``: exp(-loss), which ranks exactly like minus the loss but
    stays in (0, 1], so that the floor reward 0 of a failed trial remains the worst value a searcher sees."""
    return float(ap if reward == "ap" else math.exp(-val_loss))


def injected_failure(seed: int, arch: Arch | str, fail_prob: float) -> bool:
    """Whether fault injection fails this (seed, arch): a coin seeded by both, stable across runs."""
    if fail_prob <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{arch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random() < fail_prob


def decoder_cost(arch: Arch, shapes: dict[str, ShapeSpec], num_classes: int, recipe: Recipe, width: int,
                 resolution: int) -> tuple[int, float]:
    """(parameters, GFLOPs) of the decoder for one R x R image, built on the meta device.

    Counted on a batch of two (GroupNorm refuses a single value per group, which width 32 gives on
    a 1 x 1 P7) and halved; DCNs run through torchvision's op, which the counter knows.
    """
    from detector.commands.describe import count_parameters, flop_counter

    batch = 2
    with torch.device("meta"):
        fpn, head = build_decoder(arch, shapes, num_classes, recipe, width)
        features = {level: torch.empty(batch, spec.channels, resolution // spec.stride, resolution // spec.stride)
                    for level, spec in shapes.items()}
    fpn.eval()
    head.eval()
    with torch.no_grad(), flop_counter() as counter:  # a fresh decoder's DCNs are the reference (torchvision)
        head(fpn(features))
    return count_parameters(fpn) + count_parameters(head), counter.get_total_flops() / batch / 1e9


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


def load_features(cache_path: str | os.PathLike) -> ProxyFeatures:
    """The features of a cache folder, verified and read once per process (and file version)."""
    cache = FeatureCache(Path(cache_path).parent, Path(cache_path).name)
    stat = cache.tensor_file.stat()
    key = (str(cache.tensor_file), stat.st_size, stat.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = cache.load(verify=True, mmap=True)  # mmap: no second copy in RAM
    return _LOADED[key]


@dataclass
class PlacedSplit:
    """A split with its features where training reads them: on the device, or pinned CPU memory."""

    features: dict[str, Tensor]  # level -> (N, C_l, H_l, W_l) fp16
    split: SplitFeatures

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Features of ``indices`` as float32 on ``device``: {level: (B, C_l, H_l, W_l)}."""
        return {k: v[indices.to(v.device)].to(device, torch.float32, non_blocking=True)
                for k, v in self.features.items()}


def place_split(split: SplitFeatures, device: torch.device) -> PlacedSplit:
    """Move the features to ``device`` when they take at most half of its free memory."""
    size = sum(t.numel() * t.element_size() for t in split.features.values())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size > free // 2:
            return PlacedSplit({k: v.pin_memory() for k, v in split.features.items()}, split)
    return PlacedSplit({k: v.to(device) for k, v in split.features.items()}, split)


def train_decoder(fpn: nn.Module, head: nn.Module, train: PlacedSplit, settings: TrialSettings, recipe: Recipe,
                  num_classes: int, device: torch.device, seed: int, report: Report | None = None,
                  deadline: float = math.inf, last_stage: nn.Module | None = None) -> float:
    """Train the decoder for ``settings.iters`` SGD iterations; returns the last training loss.

    Batches are drawn without replacement from a generator seeded with ``seed`` (a new permutation
    per epoch). With ``last_stage`` (a backbone ``layer4``) C5 is recomputed from the batch's C4
    every iteration and the stage trains with the decoder. Raises :class:`TrialDiverged` /
    :class:`TrialTimeout` (``evaluate`` turns them into results).
    """
    s = settings
    modules = [fpn, head] + ([last_stage] if last_stage is not None else [])
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for module in modules:
        module.train()
    loss_value = math.nan
    for iteration in range(s.iters):
        if len(order) < s.batch_size:
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        batch, order = order[: s.batch_size], order[s.batch_size:]
        features = train.batch(batch, device)  # {level: (B, C_l, H_l, W_l)}
        targets = train.split.targets(batch, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(iteration, s.iters, s.warmup_iters, s.lr)
        with autocast_context(device, s.amp):
            if last_stage is not None:
                features = with_last_stage(features, last_stage)
            loss = decoder_losses(fpn, head, features, targets, recipe, num_classes)
        if s.inject_nan is not None and iteration == s.inject_nan:
            loss = loss * math.nan
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrialDiverged(f"training loss became {loss_value} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
        optimizer.step()
        if report is not None and ((iteration + 1) % s.report_every == 0 or iteration + 1 == s.iters):
            report({"iteration": iteration + 1, "loss": loss_value})
        if time.perf_counter() > deadline:
            raise TrialTimeout(f"past proxy_eval.timeout_s={s.timeout_s} s at iteration {iteration + 1}/{s.iters}")
    return loss_value


@torch.no_grad()
def predict_decoder(fpn: nn.Module, head: nn.Module, val: PlacedSplit, settings: TrialSettings, recipe: Recipe,
                    num_classes: int, device: torch.device, deadline: float = math.inf,
                    last_stage: nn.Module | None = None) -> tuple[float, list[list[dict[str, Tensor]]]]:
    """Mean validation loss sum and the detections of every proxy-val image (in batches).

    With ``last_stage`` C5 is ``last_stage(C4)`` (eval mode) instead of the cached C5.
    """
    for module in (fpn, head, last_stage):
        if module is not None:
            module.eval()
    total_loss, detections = 0.0, []
    for first in range(0, len(val), settings.eval_batch_size):
        indices = list(range(first, min(first + settings.eval_batch_size, len(val))))
        features = val.batch(torch.tensor(indices), device)
        with autocast_context(device, settings.amp):
            if last_stage is not None:
                features = with_last_stage(features, last_stage)
            head_out = head(fpn(features))
        points = points_for(head_out["cls_logits"], recipe.point_offset)
        losses = compute_losses(head_out, points, val.split.targets(indices, device), recipe, num_classes)
        total_loss += float(sum(losses.values())) * len(indices)
        detections.append(postprocess(head_out, points, [val.split.sizes[i] for i in indices], recipe))
        if time.perf_counter() > deadline:
            raise TrialTimeout(f"past proxy_eval.timeout_s={settings.timeout_s} s during validation")
    val_loss = total_loss / max(1, len(val))
    if not math.isfinite(val_loss):
        raise TrialDiverged(f"validation loss is {val_loss}")
    return val_loss, detections


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

    def __init__(self, cache_path: str | os.PathLike, settings: TrialSettings, recipe: Recipe) -> None:
        self.cache_path = str(cache_path)
        self.settings = settings
        self.recipe = recipe if settings.score_thresh is None else replace(recipe, score_thresh=settings.score_thresh)
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}  # features are reloaded in the receiving process

    def _loaded(self) -> dict[str, Any]:
        if self._state is None:
            from proxy_eval.build import resolve_device

            data = load_features(self.cache_path)
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
