"""The backbone's last stage as a trainable part of a proxy trial (``proxy_eval.train_last_stage``).

With ``train_last_stage: true`` a trial trains the backbone's last stage (ResNet ``layer4``, the
stage that turns C4 into C5) together with the candidate decoder, starting from the adapted
weights, while C3 and C4 stay the cached, frozen features. Each iteration recomputes
C5 = layer4(C4) from the cached C4. The aim: full training trains the backbone under the decoder,
and a decoder that only fits frozen features fast should not win the proxy for that alone.

Contract:

- :func:`check_supported` (``proxy_eval.prepare``, before adapting): only ResNet backbones
  (``detector.model.backbone.ResNetBackbone``) that return both C4 and C5 and do not freeze the last
  stage (``backbone.frozen_stages`` < 4) are supported; anything else raises
  :class:`LastStageError` (a :class:`~detector.errors.UserError`) naming the setting.
- :func:`last_stage_payload` (``proxy_eval.prepare``, after adapting): the adapted ``layer4``
  weights as a plain dict ``{"backbone", "norm", "input", "output", "state"}`` (float tensors
  fp32, on the CPU) that the feature cache stores inside its checksummed tensor file.
- :func:`build_last_stage` (one trial): a fresh ``layer4`` module holding a *copy* of those
  weights on ``device`` (no RNG is consumed; every trial starts from the same adapted weights;
  ``syncbn`` becomes ``bn``: a trial is one process).
- :func:`with_last_stage`: the features of a batch with C5 replaced by ``stage(C4)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from detector.errors import UserError

INPUT_LEVEL = "c4"   # cached, frozen: the last stage's input
OUTPUT_LEVEL = "c5"  # recomputed every iteration
STAGE = "layer4"     # the ResNet stage that produces C5
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet50_caffe", "resnet101")


class LastStageError(UserError):
    """``proxy_eval.train_last_stage=true`` with a backbone or a cache that cannot support it."""


def check_supported(name: str, levels: tuple[str, ...] | list[str], frozen_stages: int) -> None:
    """Raise :class:`LastStageError` unless the backbone can train its last stage in trials."""
    if name not in RESNETS:
        raise LastStageError(f"proxy_eval.train_last_stage=true supports the ResNet backbones "
                             f"({', '.join(RESNETS)}), not backbone.name={name}; set "
                             "proxy_eval.train_last_stage=false")
    missing = [level for level in (INPUT_LEVEL, OUTPUT_LEVEL) if level not in levels]
    if missing:
        raise LastStageError(f"proxy_eval.train_last_stage=true needs backbone.levels to hold {INPUT_LEVEL} "
                             f"and {OUTPUT_LEVEL} (C5 is recomputed from the cached C4); "
                             f"backbone.levels={list(levels)} lacks {', '.join(missing)}")
    if frozen_stages >= 4:
        raise LastStageError(f"proxy_eval.train_last_stage=true trains {STAGE}, which "
                             f"backbone.frozen_stages={frozen_stages} freezes; use frozen_stages <= 3")


def last_stage_payload(backbone: nn.Module, name: str, norm: str) -> dict[str, Any]:
    """The adapted last stage of ``backbone`` (a ResNetBackbone) as a cache-ready plain dict."""
    stage = getattr(backbone, STAGE, None)
    if stage is None:
        raise LastStageError(f"proxy_eval.train_last_stage=true: {type(backbone).__name__} has no {STAGE}")
    state = {key: (value.detach().to("cpu", torch.float32) if value.is_floating_point() else value.detach().cpu())
             .clone() for key, value in stage.state_dict().items()}
    return {"backbone": name, "norm": norm, "input": INPUT_LEVEL, "output": OUTPUT_LEVEL, "state": state}


def build_last_stage(payload: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """A trainable ``layer4`` holding a copy of the cached adapted weights, on ``device``."""
    from detector.model.backbone import build_backbone

    norm = "bn" if payload["norm"] == "syncbn" else str(payload["norm"])  # a trial is one process
    with torch.device("meta"):  # structure only: no RNG, no memory, no initialisation cost
        backbone = build_backbone(str(payload["backbone"]), "none", frozen_stages=-1, norm=norm,
                                  levels=(str(payload["output"]),))
    stage = getattr(backbone, STAGE)
    state = {key: value.to(device, copy=True) for key, value in payload["state"].items()}
    stage.load_state_dict(state, strict=True, assign=True)
    return stage.requires_grad_(True)


def with_last_stage(features: Mapping[str, Tensor], stage: nn.Module) -> dict[str, Tensor]:
    """``features`` ({level: (B, C_l, H_l, W_l)}) with C5 recomputed as ``stage(C4)``."""
    out = dict(features)
    out[OUTPUT_LEVEL] = stage(features[INPUT_LEVEL])  # (B, C5, H/32, W/32)
    return out
