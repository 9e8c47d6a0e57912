"""Training a decoder (FPN + head) on backbone features: the loop shared by the cached proxy's
trials (:mod:`proxy_eval.cached`) and, for its pieces, the backbone adaptation (:mod:`proxy_eval.prepare`).

- :func:`lr_at` -- linear warmup from lr/3, then cosine decay to lr/100;
- :func:`autocast_context` -- bf16 autocast on CUDA, nothing on the CPU;
- :func:`decoder_losses` -- the FCOS loss sum of a decoder on ``{level: features}``;
- :class:`PlacedSplit` / :func:`place_split` -- a split's cached features where training reads them;
- :func:`train_decoder`, :func:`predict_decoder` -- the trial's training loop and its validation pass.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from detector.engine.step import optimizer_step
from detector.model.loss import compute_losses
from detector.model.points import points_for
from detector.model.postprocess import postprocess
from detector.model.recipe import Recipe
from proxy_eval.feature_cache import SplitFeatures
from proxy_eval.last_stage import with_last_stage
from proxy_eval.result import TrialDiverged, TrialTimeout
from proxy_eval.settings import TrialSettings


Report = Callable[[dict], None]


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
    window: list[float] = []  # the losses since the previous report
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
        optimizer_step(loss, optimizer, params, s.clip_grad)
        window.append(loss_value)
        if report is not None and ((iteration + 1) % s.report_every == 0 or iteration + 1 == s.iters):
            report({"iteration": iteration + 1, "loss": loss_value, "loss_window": sum(window) / len(window)})
            window.clear()
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
