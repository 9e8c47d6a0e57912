"""Backbones: torchvision ResNets and MobileNetV2, EfficientNet-Lite and timm models, returning named levels.

``build_backbone(name, weights, frozen_stages, norm, levels)`` is the only constructor users meet.
A backbone declares its outputs before anything runs (``output_shapes()``, detectron2 style), so
the FPN and head can be built from the declaration, and carries the input normalisation its
weights expect (``pixel_mean``, ``pixel_std``, ``input_format``); the detector applies it.

Levels are ``c2``..``c5`` at strides 4, 8, 16, 32. Stages, for freezing, follow mmdetection's
``frozen_stages``: -1 freezes nothing, 0 the stem, k the stem and the first k stages.

``efficientnet_lite0/1/2`` and ``timm:<model>`` are built by :mod:`detector.model.timm_backbone`.
``norm`` and ``frozen_stages`` may be ``"auto"`` in configs: :func:`resolve_freezing` turns them
into frozen BN + frozen stem and first stage for pretrained weights (the NAS-FCOS recipe) and
batch statistics with nothing frozen for random init (a network from scratch must learn its
BatchNorm statistics).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detector.errors import UserError

LEVEL_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
LEVEL_STAGE = {"c2": 1, "c3": 2, "c4": 3, "c5": 4}  # the stage whose output is the level

EFFICIENTNET_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet50_caffe", "resnet101", "mobilenet_v2",
                  *EFFICIENTNET_LITE_NAMES)
TIMM_NAME_FORM = "timm:<model>"  # any timm model with features_only (detector/model/timm_backbone.py)
NORMS = ("frozen_bn", "bn", "syncbn")
AUTO = "auto"

RGB01_MEAN, RGB01_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision ImageNet
BGR255_MEAN, BGR255_STD = (103.530, 116.280, 123.675), (1.0, 1.0, 1.0)  # MSRA caffe weights

_TORCHVISION_BUILDERS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet50_caffe": (torchvision.models.resnet50, None),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, "MobileNet_V2_Weights"),
}
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


class BackboneError(UserError):
    """A backbone was asked for with a bad name, level list, norm or stage count."""


class WeightsError(BackboneError):
    """Backbone weights could not be obtained or do not fit the network."""


@dataclass(frozen=True)
class ShapeSpec:
    """What a feature level looks like: channel count and stride relative to the input."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: a feature extractor returning ``{level: (N, C_l, H/s_l, W/s_l)}``.

    Subclasses set ``levels``, ``_shapes`` and implement ``stage_modules()`` (stem first) and
    ``forward``. ``input_format`` is ``"rgb01"`` (RGB in 0..1, then (x - mean) / std) or
    ``"bgr255"`` (BGR in 0..255, then x - mean).
    """

    input_format = "rgb01"
    pixel_mean: tuple[float, float, float] = RGB01_MEAN
    pixel_std: tuple[float, float, float] = RGB01_STD

    def __init__(self, levels: tuple[str, ...], frozen_stages: int) -> None:
        super().__init__()
        self.levels = levels
        self.frozen_stages = frozen_stages
        self._shapes: dict[str, ShapeSpec] = {}

    def output_shapes(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every returned level, known before any forward pass."""
        return dict(self._shapes)

    def stage_modules(self) -> list[list[nn.Module]]:
        raise NotImplementedError

    def freeze(self) -> None:
        """Stop gradients into the stem and the first ``frozen_stages`` stages."""
        for stage in self.stage_modules()[: self.frozen_stages + 1]:
            for module in stage:
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen stages keep their BatchNorm statistics fixed (matters for norm=bn/syncbn).
        super().train(mode)
        for stage in self.stage_modules()[: self.frozen_stages + 1]:
            for module in stage:
                module.eval()
        return self


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class ResNetBackbone(Backbone):
    """A torchvision ResNet without pooling and classifier; keeps torchvision's parameter names."""

    def __init__(self, resnet: torchvision.models.ResNet, levels: tuple[str, ...], frozen_stages: int,
                 caffe: bool = False) -> None:
        super().__init__(levels, frozen_stages)
        if caffe:
            self.input_format, self.pixel_mean, self.pixel_std = "bgr255", BGR255_MEAN, BGR255_STD
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.num_stages = max(LEVEL_STAGE[level] for level in levels)
        for index in range(1, self.num_stages + 1):
            stage = getattr(resnet, f"layer{index}")
            self.add_module(f"layer{index}", stage)
        for level in levels:
            stage = getattr(self, f"layer{LEVEL_STAGE[level]}")
            self._shapes[level] = ShapeSpec(_last_conv_channels(stage), LEVEL_STRIDES[level])

    def stage_modules(self) -> list[list[nn.Module]]:
        stem = [self.conv1, self.bn1]
        return [stem] + [[getattr(self, f"layer{i}")] for i in range(1, self.num_stages + 1)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, 3, H, W) normalised as ``input_format`` says -> {level: (N, C_l, H/s_l, W/s_l)}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        outputs = {}
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
            level = f"c{index + 1}"
            if level in self.levels:
                outputs[level] = x
        return outputs


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 ``features``; taps after blocks 3, 6, 13, 18 (strides 4..32)."""

    TAPS = {"c2": 3, "c3": 6, "c4": 13, "c5": 18}  # index of the last block of each level
    STAGE_STARTS = (0, 2, 4, 7, 14)  # stem = features[0:2], stage k = features[start_k:start_k+1]

    def __init__(self, model: torchvision.models.MobileNetV2, levels: tuple[str, ...],
                 frozen_stages: int) -> None:
        super().__init__(levels, frozen_stages)
        last = max(self.TAPS[level] for level in levels)
        self.features = model.features[: last + 1]
        self._tap_to_level = {self.TAPS[level]: level for level in levels}
        for level in levels:
            self._shapes[level] = ShapeSpec(
                _last_conv_channels(self.features[self.TAPS[level]]), LEVEL_STRIDES[level])

    def stage_modules(self) -> list[list[nn.Module]]:
        bounds = list(self.STAGE_STARTS) + [len(self.features)]
        return [list(self.features[bounds[i]:bounds[i + 1]]) for i in range(len(self.STAGE_STARTS))
                if bounds[i] < len(self.features)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, 3, H, W) RGB normalised -> {level: (N, C_l, H/s_l, W/s_l)}."""
        outputs = {}
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self._tap_to_level:
                outputs[self._tap_to_level[index]] = x
        return outputs


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return nn.SyncBatchNorm


def _download_imagenet_state_dict(name: str) -> dict[str, Tensor]:
    _, weights_enum_name = _TORCHVISION_BUILDERS[name]
    if weights_enum_name is None:
        raise WeightsError(
            f"backbone.weights=imagenet: torchvision has no ImageNet weights for '{name}' (caffe-style "
            "ResNet-50); pass a local file holding the MSRA weights with torchvision parameter names: "
            "backbone.weights=/path/to/file.pth")
    weights = getattr(torchvision.models, weights_enum_name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a broken download a RuntimeError
        raise WeightsError(
            f"backbone.weights=imagenet: could not download {weights} ({type(error).__name__}: {error}); "
            "without network, download the file elsewhere and pass it as "
            "backbone.weights=/path/to/file.pth (or use backbone.weights=none for random init)") from error


def read_state_dict_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"backbone.weights: no file at '{path}'; pass 'imagenet', 'none' or the path "
                           "of a .pth state dict")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise WeightsError(f"backbone.weights: cannot read '{path}' as a torch state dict "
                           f"({type(error).__name__}: {error})") from error
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise WeightsError(f"backbone.weights: '{path}' does not hold a state dict (got {type(loaded).__name__})")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _load_weights(model: nn.Module, name: str, weights: str) -> None:
    """Load ImageNet or file weights into a full torchvision classification model."""
    if weights == "imagenet":
        state_dict = _download_imagenet_state_dict(name)
    else:
        state_dict = read_state_dict_file(weights)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise WeightsError(
            f"backbone.weights='{weights}' does not fit {name}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected keys); expected a "
            f"torchvision {name} state dict")


def _move_stride_to_1x1(resnet: torchvision.models.ResNet) -> None:
    """Caffe/MSRA bottlenecks downsample in the first 1x1 conv, torchvision's in the 3x3."""
    for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)


def resolve_freezing(weights: str | None, frozen_stages: int | str, norm: str) -> tuple[int, str]:
    """``(frozen_stages, norm)`` with ``"auto"`` replaced by the default for these weights.

    Pretrained (``imagenet`` or a file): frozen BN, stem and first stage frozen (NAS-FCOS, FCOS and
    mmdetection train detectors so). Random init (``none``): batch statistics, nothing frozen.
    """
    pretrained = weights is not None and str(weights) != "none"
    if str(frozen_stages) == AUTO:
        frozen_stages = 1 if pretrained else -1
    elif isinstance(frozen_stages, str) and frozen_stages.lstrip("-").isdigit():
        frozen_stages = int(frozen_stages)
    if not isinstance(frozen_stages, int) or isinstance(frozen_stages, bool):
        raise BackboneError(f"backbone.frozen_stages={frozen_stages!r}: expected auto or an int in -1..4 "
                            "(-1 none, 0 stem, k stem and the first k stages)")
    if str(norm) == AUTO:
        norm = "frozen_bn" if pretrained else "bn"
    return frozen_stages, str(norm)


def _validate(name: str, frozen_stages: int, norm: str, levels: tuple[str, ...]) -> None:
    if name not in BACKBONE_NAMES and not name.startswith("timm:"):
        raise BackboneError(f"backbone: unknown name '{name}'; choose one of {', '.join(BACKBONE_NAMES)} "
                            f"or {TIMM_NAME_FORM} (backbone=timm backbone.model=<model>)")
    if norm not in NORMS:
        raise BackboneError(f"backbone.norm: unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
        raise BackboneError(f"backbone.frozen_stages={frozen_stages!r}: expected an int in -1..4 "
                            "(-1 none, 0 stem, k stem and the first k stages) or auto")
    unknown = [level for level in levels if level not in LEVEL_STRIDES]
    if not levels or unknown or len(set(levels)) != len(levels):
        raise BackboneError(f"backbone.levels={list(levels)}: expected distinct names among "
                            f"{', '.join(LEVEL_STRIDES)}")


def build_backbone(name: str, weights: str = "none", frozen_stages: int | str = 1, norm: str = "frozen_bn",
                   levels: tuple[str, ...] = ("c3", "c4", "c5")) -> Backbone:
    """Build a named backbone returning ``levels`` (sorted by stride).

    weights: ``"none"`` (random init), ``"imagenet"`` (torchvision weights API, downloads once; raises
    :class:`WeightsError` offline; for ``efficientnet_lite*`` the installed weights package, offline)
    or a path to a ``.pth`` state dict with torchvision (timm for timm models) names.
    ``frozen_stages`` and ``norm`` may be ``"auto"`` (see :func:`resolve_freezing`).
    """
    levels = tuple(sorted(levels, key=lambda level: LEVEL_STRIDES.get(level, 0)))
    frozen_stages, norm = resolve_freezing(weights, frozen_stages, norm)
    _validate(name, frozen_stages, norm, levels)
    weights = "none" if weights is None else str(weights)
    if name in EFFICIENTNET_LITE_NAMES or name.startswith("timm:"):
        from detector.model.timm_backbone import build_timm_backbone

        timm_backbone = build_timm_backbone(name, weights, frozen_stages, norm, levels)
        timm_backbone.freeze()
        return timm_backbone
    builder, _ = _TORCHVISION_BUILDERS[name]
    model = builder(weights=None, norm_layer=_norm_layer(norm))
    if name == "resnet50_caffe":
        _move_stride_to_1x1(model)
    if weights is not None and str(weights) != "none":
        _load_weights(model, name, str(weights))
    if name == "mobilenet_v2":
        backbone: Backbone = MobileNetV2Backbone(model, levels, frozen_stages)
    else:
        backbone = ResNetBackbone(model, levels, frozen_stages, caffe=name == "resnet50_caffe")
    backbone.freeze()
    return backbone
