"""Optimizer and learning-rate schedule of detector training (the authors' 1x recipe, DESIGN section 7).

- :func:`build_optimizer`: SGD with momentum over two parameter groups: weights at ``lr`` with
  ``weight_decay``; biases at ``lr * bias_lr_factor`` (2x) with ``bias_weight_decay`` (0). Frozen
  parameters (``requires_grad=False``) are left out. "Bias" means every 1-d parameter named
  ``*.bias`` (normalisation weights are 1-d too but keep the weight group's settings, as in the
  authors' maskrcnn-benchmark solver).
- :func:`lr_factor`: the multiplier of the base lr at an iteration: linear warmup from
  ``warmup_factor`` to 1 over ``warmup_iters``, then ``multistep`` (x ``gamma`` at each of
  ``steps``) or ``cosine`` (from 1 down to 0 at ``iterations``).
- :func:`build_scheduler`: a ``LambdaLR`` over that factor, stepped once per iteration.

Schedule keys (``conf/schedule/*.yaml``): iterations, lr, momentum, weight_decay, bias_lr_factor,
bias_weight_decay, warmup_iters, warmup_factor, policy (multistep | cosine), steps, gamma.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from detector.errors import UserError

POLICIES = ("multistep", "cosine")


class ScheduleError(UserError):
    """A schedule config value is missing or out of range."""


@dataclass(frozen=True)
class Schedule:
    """The schedule config as a checked value (see the module docstring for the keys)."""

    iterations: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    warmup_iters: int = 0
    warmup_factor: float = 1.0 / 3
    policy: str = "multistep"
    steps: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ScheduleError(f"schedule: {what}")

        need(self.iterations > 0, f"iterations={self.iterations} must be > 0")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(self.policy in POLICIES, f"policy={self.policy!r}: use one of {', '.join(POLICIES)}")
        need(self.warmup_iters >= 0, f"warmup_iters={self.warmup_iters} must be >= 0")
        need(0 < self.warmup_factor <= 1, f"warmup_factor={self.warmup_factor} must be in (0, 1]")
        need(list(self.steps) == sorted(self.steps), f"steps={list(self.steps)} must be increasing")
        need(all(0 < s for s in self.steps), f"steps={list(self.steps)} must be positive iterations")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "Schedule":
        """From a ``schedule`` config node (OmegaConf or mapping) holding every field, as the YAMLs of
        ``conf/schedule/`` do (they are the one source of the values); a missing or unknown key is a
        ScheduleError naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        given = list(cfg.keys())
        unknown = sorted(str(k) for k in given if k not in names)
        missing = [k for k in names if k not in given]
        if unknown or missing:
            what = f"'{unknown[0]}' is not a schedule setting" if unknown else f"'{missing[0]}' is missing"
            raise ScheduleError(f"schedule: {what}; a schedule sets {', '.join(names)} (see conf/schedule/1x.yaml)")
        try:
            return cls(
                iterations=int(cfg["iterations"]),
                lr=float(cfg["lr"]),
                momentum=float(cfg["momentum"]),
                weight_decay=float(cfg["weight_decay"]),
                bias_lr_factor=float(cfg["bias_lr_factor"]),
                bias_weight_decay=float(cfg["bias_weight_decay"]),
                warmup_iters=int(cfg["warmup_iters"]),
                warmup_factor=float(cfg["warmup_factor"]),
                policy=str(cfg["policy"]),
                steps=tuple(int(s) for s in (cfg["steps"] or ())),
                gamma=float(cfg["gamma"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ScheduleError):
                raise
            raise ScheduleError(f"schedule: bad or missing value ({err}); see conf/schedule/1x.yaml") from None


def lr_factor(schedule: Schedule, iteration: int) -> float:
    """Multiplier of the base lr for the update made at ``iteration`` (0-based)."""
    if schedule.policy == "multistep":
        factor = schedule.gamma ** bisect.bisect_right(schedule.steps, iteration)
    else:
        progress = min(iteration / schedule.iterations, 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= schedule.warmup_factor * (1.0 - alpha) + alpha
    return factor


def parameter_groups(model: nn.Module, schedule: Schedule) -> list[dict]:
    """Trainable parameters split into a weight group and a bias group (2x lr, no decay)."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (biases if name.rsplit(".", 1)[-1] == "bias" else weights).append(param)
    groups = [{"params": weights, "lr": schedule.lr, "weight_decay": schedule.weight_decay, "name": "weights"}]
    if biases:
        groups.append({
            "params": biases,
            "lr": schedule.lr * schedule.bias_lr_factor,
            "weight_decay": schedule.bias_weight_decay,
            "name": "biases",
        })
    return groups


def build_optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.SGD:
    """SGD with momentum over :func:`parameter_groups` of ``model``."""
    groups = parameter_groups(model, schedule)
    if not groups[0]["params"] and len(groups) == 1:
        raise ScheduleError("the model has no trainable parameters (is every stage frozen?)")
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration ``LambdaLR``: every group's lr = its base lr * :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(schedule, it))
