"""End-to-end proxy: each candidate trains as a whole detector, backbone included, on the proxy split.

``proxy_eval=end_to_end`` (:class:`EndToEndEvaluator`) implements the evaluator contract::

    evaluate(arch, seed=0, report=None) -> TrialResult      # never raises

Where the cached proxy (:mod:`proxy_eval.cached`) trains only the decoder on features of a frozen,
briefly adapted backbone, a trial here is a short version of the real retraining: the full FCOS of
``arch`` is built as ``python -m detector train`` builds it (``cfg.backbone`` with its start
weights, ``cfg.recipe``, width ``proxy_eval.width`` or ``cfg.model.width``), trained on the
proxy-train images through the training data pipeline (``cfg.data``'s transforms and
augmentation, the seeded stream of :mod:`detector.data.stream`) for ``iters`` SGD iterations with
the training engine's optimizer (:func:`detector.engine.optim.build_optimizer`: bias lr x2, no weight
decay on biases) under its own short schedule (linear warmup from lr / 3, cosine decay), then
scored on proxy-val with pycocotools (:func:`detector.engine.evaluate.evaluate`). Both image lists come
from the training split (:mod:`proxy_eval.splits`, seeded by ``split_seed``); the official val split
is never read. Why this mode exists: experiments/search_quality/README.md, attempts 13-14 (the AP
of a short full training ranks architectures like their final AP; the frozen-feature proxy does not).

Result fields as in the cached proxy: ``reward`` is ``ap`` or ``neg_loss`` = exp(-mean proxy-val
loss sum), the loss computed in train mode with BatchNorm on its running statistics (no update);
``params`` / ``gflops`` are the decoder's for one ``cost_resolution`` x ``cost_resolution`` image;
``extra`` holds ``train_loss``, ``AP75``, ``seed`` and ``setup_seconds`` (``data``, ``build``).
Failures are values (``diverged``, ``oom``, ``timeout``, ``error``), with the same fault injection
(``fail_prob``, ``inject_nan``). On CPU a
trial is deterministic for a given seed (the model is built under ``torch.manual_seed(seed)`` with
the caller's RNG restored; the data stream is a function of (seed, iteration)).

The evaluator is picklable: only settings and plain config containers travel; datasets are opened
once per process. The driver calls :func:`prepare_data` once before any trial (it generates the
synthetic data if needed and checks the split sizes), so workers never write.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from detector.arch.grammar import Arch
from detector.data.transforms import collate
from detector.errors import UserError
from detector.engine.evaluate import evaluate as coco_evaluate
from detector.engine.optim import Schedule, build_optimizer, build_scheduler
from detector.engine.step import forward_losses, optimizer_step
from detector.model.recipe import Recipe
from detector.data.stream import batch_to_device, build_train_stream
from detector.arch.zoo import resolve_arch
from proxy_eval.result import (InjectedFailure, TrialDiverged, TrialResult, TrialTimeout, failed_trial, injected_failure,
                               trial_reward)
from proxy_eval.splits import ProxySplits, make_splits
from proxy_eval.settings import TrialSettings, resolve_device
from detector.model.cost import decoder_cost

Report = Callable[[dict], None]


@dataclass(frozen=True)
class EndToEndData:
    """What every trial reads: the data config, where the data is, and the proxy split ids."""

    data_cfg: dict[str, Any]
    cache_dir: str | None
    splits: ProxySplits


@dataclass(frozen=True)
class ModelSpec:
    """How the candidate detector is built (the keys ``build_detector_from_cfg`` reads), as plain values."""

    backbone: dict[str, Any]
    recipe: dict[str, Any]
    num_classes: int
    width: int

    def config(self) -> Any:
        from omegaconf import OmegaConf

        return OmegaConf.create({"backbone": self.backbone, "recipe": self.recipe,
                                 "data": {"num_classes": self.num_classes}, "model": {"width": self.width}})


def prepare_data(data_cfg: Any, cache_dir: str | None, train_images: int | None, val_images: int,
                 split_seed: int) -> EndToEndData:
    """Generate / find the data, draw the proxy splits from the training split; SplitError if they do not fit."""
    from omegaconf import OmegaConf

    from detector.data.coco import CocoDetection, resolve_data_root, split_paths

    plain = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    root = resolve_data_root(plain, cache_dir)
    image_dir, ann_file = split_paths(plain, root, "train")  # the proxy never reads the val split
    dataset = CocoDetection(image_dir, ann_file, None)
    splits = make_splits(dataset.image_ids, train_images, val_images, split_seed)
    return EndToEndData(data_cfg={**plain, "root": str(root)}, cache_dir=cache_dir, splits=splits)


def _subset(dataset: Any, image_ids: tuple[int, ...]) -> Subset:
    index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
    return Subset(dataset, [index_of[int(i)] for i in image_ids])


def _short_schedule(settings: TrialSettings) -> Schedule:
    return Schedule(iterations=settings.iters, lr=settings.lr, momentum=settings.momentum,
                    weight_decay=settings.weight_decay, warmup_iters=min(settings.warmup_iters, settings.iters - 1),
                    policy="cosine")


def _amp_dtype(settings: TrialSettings, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and settings.amp != "off" else None


def train_detector(model: nn.Module, stream: Any, settings: TrialSettings, device: torch.device,
                   report: Report | None = None, deadline: float = math.inf) -> float:
    """``settings.iters`` SGD iterations of the whole detector on ``stream``; the last training loss.

    The loss is read back (a host sync) every ``report_every`` iterations and after the last: a
    non-finite value raises :class:`~proxy_eval.result.TrialDiverged`, a step past ``deadline``
    :class:`~proxy_eval.result.TrialTimeout`. Each report carries the iteration's ``loss`` and
    ``loss_window``, the mean loss of the iterations since the previous report (summed on the device,
    read with the loss: no extra sync).
    """
    s = settings
    schedule = _short_schedule(s)
    optimizer = build_optimizer(model, schedule)
    scheduler = build_scheduler(optimizer, schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    amp_dtype = _amp_dtype(s, device)
    model.train()
    loss_value = math.nan
    window_sum, window_start = torch.zeros((), device=device), 0
    for iteration in range(s.iters):
        images, targets = batch_to_device(*next(stream), device)
        loss = sum(forward_losses(model, images, targets, device, amp_dtype).values())
        if s.inject_nan is not None and iteration == s.inject_nan:
            loss = loss * math.nan
        optimizer_step(loss, optimizer, params, s.clip_grad)
        scheduler.step()
        window_sum += loss.detach().float()
        done = iteration + 1
        if done % s.report_every == 0 or done == s.iters or (s.inject_nan is not None and iteration == s.inject_nan):
            loss_value, window_total = torch.stack([loss.detach().float(), window_sum]).tolist()
            if not math.isfinite(loss_value):
                raise TrialDiverged(f"training loss became {loss_value} by iteration {done}")
            if report is not None:
                report({"iteration": done, "loss": loss_value, "loss_window": window_total / (done - window_start)})
            window_sum.zero_()
            window_start = done
        if time.perf_counter() > deadline:
            raise TrialTimeout(f"past proxy_eval.timeout_s={s.timeout_s} s at iteration {done}/{s.iters}")
    return loss_value


@torch.no_grad()
def validation_loss(model: nn.Module, loader: Any, settings: TrialSettings, device: torch.device) -> float:
    """Mean per-image loss sum on ``loader``: train-mode losses, BatchNorm on running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()  # no batch statistics, no running-stat update
    amp_dtype = _amp_dtype(settings, device)
    total, count = 0.0, 0
    try:
        for images, targets in loader:
            images, targets = batch_to_device(images, targets, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(images, targets)
            total += float(sum(losses.values())) * len(images)
            count += len(images)
    finally:
        model.eval()
    value = total / max(1, count)
    if not math.isfinite(value):
        raise TrialDiverged(f"validation loss is {value}")
    return value


class EndToEndEvaluator:
    """Trains and scores whole candidate detectors on the proxy split (see the module docstring)."""

    def __init__(self, data: EndToEndData, model: ModelSpec, settings: TrialSettings, workers: int = 0,
                 cost_resolution: int = 128) -> None:
        if settings.train_last_stage:
            raise UserError("proxy_eval.train_last_stage is a cached-proxy setting; the end-to-end proxy "
                            "trains the whole backbone already (drop the override)")
        self.data, self.model, self.settings = data, model, settings
        self.workers, self.cost_resolution = int(workers), int(cost_resolution)
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}  # datasets are reopened in the receiving process

    @property
    def recipe(self) -> Recipe:
        recipe = Recipe.from_cfg(self.model.recipe)
        return recipe if self.settings.score_thresh is None else replace(recipe, score_thresh=self.settings.score_thresh)

    def _loaded(self) -> dict[str, Any]:
        if self._state is None:
            from detector.data.coco import build_dataset
            cfg, cache_dir = self.data.data_cfg, self.data.cache_dir
            train = build_dataset(cfg, "train", train=True, cache_dir=cache_dir, uint8_images=True)
            val = build_dataset(cfg, "train", train=False, cache_dir=cache_dir)
            self._state = {"device": torch.device(resolve_device(self.settings.device)),
                           "train": _subset(train, self.data.splits.train_ids),
                           "val": _subset(val, self.data.splits.val_ids)}
        return self._state

    def _build(self, arch: Arch, seed: int, device: torch.device) -> nn.Module:
        from detector.model.build import build_detector_from_cfg
        from detector.fast.switch import set_fast_paths, training_fast_paths

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_detector_from_cfg(self.model.config(), arch)
        model.recipe = self.recipe
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model = set_fast_paths(model, training_fast_paths("auto", device), deform=self.settings.deform_impl)
        if self.settings.cuda_graph and device.type == "cuda":
            from detector.fast.graphs.training import install_training_graph

            install_training_graph(model, self.graph_pad())
        return model

    def graph_pad(self) -> tuple[int, int] | None:
        """The (H, W) every training batch is padded to under ``proxy_eval.cuda_graph``, so that one
        capture serves the whole trial: ``cuda_graph_pad``, else the data's ``image_max_side`` rounded
        up to the detector's padding multiple (32) on both sides, else None (each new shape recaptures)."""
        if self.settings.cuda_graph_pad is not None:
            return self.settings.cuda_graph_pad
        side = self.data.data_cfg.get("image_max_side", None)
        if not side:
            return None
        side = math.ceil(int(side) / 32) * 32
        return side, side

    def evaluate(self, arch: Arch | str, seed: int = 0, report: Report | None = None) -> TrialResult:
        """Train and score one candidate; every failure comes back as a result (see module doc)."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        notes: dict[str, Any] = {}
        try:
            with torch.random.fork_rng(devices=[]):  # the loaders draw their base seed from torch's RNG
                train_loss, val_loss, coco_metrics = self._trial(arch, seed, report, start, metrics, notes)
        except Exception as err:  # evaluate never raises: a broken candidate is a result
            return failed_trial(err, time.perf_counter() - start, metrics)
        ap = float(coco_metrics["AP"])
        return TrialResult(status="ok", reward=trial_reward(self.settings.reward, ap, val_loss), ap=ap, ap50=float(coco_metrics["AP50"]), loss=val_loss,
                           seconds=time.perf_counter() - start,
                           extra={"train_loss": train_loss, "AP75": float(coco_metrics["AP75"]), "seed": seed, **notes},
                           **metrics)

    def _trial(self, arch: Arch | str, seed: int, report: Report | None, start: float,
               metrics: dict[str, Any], notes: dict[str, Any]) -> tuple[float, float, dict[str, float]]:
        """(last training loss, proxy-val loss, COCO metrics); fills ``metrics`` with the decoder's cost
        and ``notes`` (the result's extra) with ``setup_seconds`` and, under ``cuda_graph``, the graph's
        captures and failures."""
        s = self.settings
        if s.threads:
            torch.set_num_threads(int(s.threads))
        if isinstance(arch, str):
            arch = resolve_arch(arch, num_blocks=None, num_head_layers=None)
        if injected_failure(seed, arch, s.fail_prob):
            raise InjectedFailure(f"injected failure (proxy_eval.fail_prob={s.fail_prob})")
        phase_start = time.perf_counter()
        state = self._loaded()
        data_done = time.perf_counter()
        device = state["device"]
        model = self._build(arch, seed, device)
        # where a trial's set-up goes (the throughput bench splits it): opening the datasets (once per
        # process, ~0 after) and building the model (weights, fast paths, graph installed, not captured)
        notes["setup_seconds"] = {"data": data_done - phase_start, "build": time.perf_counter() - data_done}
        metrics["params"], metrics["gflops"] = decoder_cost(arch, model.backbone.output_shapes(), self.model.num_classes,
                                                            self.recipe, self.model.width, self.cost_resolution)
        stream = iter(build_train_stream(state["train"], s.batch_size, seed, 0, 1, 0, self.workers,
                                         pin_memory=device.type == "cuda"))
        deadline = start + s.timeout_s
        try:
            train_loss = train_detector(model, stream, s, device, report, deadline)
        finally:
            del stream  # stops the loader's workers
        graphs = getattr(model, "train_graphs", None)
        if graphs is not None:  # whether the trial really trained from a graph; then free its memory pool
            from detector.fast.graphs.training import remove_training_graph

            notes.update(cuda_graph_captures=graphs.captures, cuda_graph_failures=len(graphs.failures))
            remove_training_graph(model)  # (about one step's activations) before evaluation and the next trial
        val_loader = DataLoader(state["val"], batch_size=s.eval_batch_size, shuffle=False, num_workers=self.workers,
                                collate_fn=collate)
        coco_metrics, _ = coco_evaluate(model, val_loader, None, _amp_dtype(s, device))
        if time.perf_counter() > deadline:
            raise TrialTimeout(f"past proxy_eval.timeout_s={s.timeout_s} s during validation")
        return train_loss, validation_loss(model, val_loader, s, device), coco_metrics

    __call__ = evaluate
