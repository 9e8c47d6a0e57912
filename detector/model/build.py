"""Building models from architecture codes: the one place that reads configs to build a model.

- :func:`build_decoder` -- (FPN, head) from an :class:`~detector.arch.grammar.Arch` and declared backbone
  shapes; used by the proxy evaluator on cached features and by everything below.
- :func:`build_parts` -- backbone, FPN and head (what :func:`build_detector` assembles and what
  ``describe`` measures).
- :func:`build_detector` -- a full :class:`~detector.model.fcos.FCOS` from explicit arguments.
- :func:`build_detector_from_cfg` -- the same from a config: ``cfg.backbone.{name, weights,
  frozen_stages, norm[, levels]}``, ``cfg.recipe``, ``cfg.data.num_classes``, ``cfg.model.width``.

Dispatch: ``fpn:standard`` -> ``detector.model.standard_fpn.StandardFPN``, a searched FPN ->
:class:`~detector.model.searched_fpn.SearchedFPNModule`; ``head:fcos`` -> ``detector.model.fcos_head.FCOSHead``,
a searched head -> :class:`~detector.model.searched_head.SearchedHeadModule`. Both heads take
``box_activation`` and ``centerness_on`` from the recipe, so the head's outputs always match the
recipe's losses; without a recipe they follow the authors' (``exp_scale``, ``cls``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from detector.model import fcos_head
from detector.model import standard_fpn
from detector.arch.grammar import Arch, FCOSHead, SearchedFPN, SearchedHead, StandardFPN
from detector.model.backbone import Backbone, ShapeSpec, build_backbone, resolve_freezing
from detector.errors import UserError
from detector.model.fcos import FCOS
from detector.model.recipe import Recipe
from detector.model.searched_fpn import SearchedFPNModule
from detector.model.searched_head import SearchedHeadModule

DEFAULT_LEVELS = ("c3", "c4", "c5")
NUM_PYRAMID_LEVELS = 5  # P3-P7
FCOS_HEAD_CONVS = 4
AUTHORS_BOX_ACTIVATION = "exp_scale"
AUTHORS_CENTERNESS_ON = "cls"


def backbone_levels(arch: Arch, levels: Sequence[str] | None = None) -> tuple[str, ...]:
    """Levels the backbone must return for ``arch``: ``levels`` (default c3-c5) plus any the FPN reads."""
    wanted = set(levels) if levels is not None else set(DEFAULT_LEVELS)
    if isinstance(arch.fpn, SearchedFPN):
        wanted |= set(arch.fpn.levels_read())
    return tuple(sorted(wanted))


def _head_settings(recipe: Recipe | None) -> tuple[str, str]:
    if recipe is None:
        return AUTHORS_BOX_ACTIVATION, AUTHORS_CENTERNESS_ON
    return recipe.box_activation, recipe.centerness_on


def build_fpn(arch: Arch, in_shapes: Mapping[str, ShapeSpec], width: int = 256) -> nn.Module:
    """The FPN module of ``arch``: backbone features dict -> [P3, P4, P5, P6, P7]."""
    if isinstance(arch.fpn, StandardFPN):
        return standard_fpn.StandardFPN(in_shapes, width)
    if isinstance(arch.fpn, SearchedFPN):
        return SearchedFPNModule(arch.fpn, in_shapes, width)
    raise TypeError(f"unknown FPN part {type(arch.fpn).__name__}")


def build_head(arch: Arch, num_classes: int, recipe: Recipe | None = None, width: int = 256) -> nn.Module:
    """The head module of ``arch``: [P3..P7] -> {"cls_logits", "bbox_reg", "centerness"}."""
    box_activation, centerness_on = _head_settings(recipe)
    if isinstance(arch.head, FCOSHead):
        return fcos_head.FCOSHead(
            width,
            num_classes,
            num_convs=FCOS_HEAD_CONVS,
            centerness_on=centerness_on,
            box_activation=box_activation,
            num_levels=NUM_PYRAMID_LEVELS,
        )
    if isinstance(arch.head, SearchedHead):
        return SearchedHeadModule(
            arch.head,
            width,
            num_classes,
            num_levels=NUM_PYRAMID_LEVELS,
            box_activation=box_activation,
            centerness_on=centerness_on,
        )
    raise TypeError(f"unknown head part {type(arch.head).__name__}")


def build_decoder(
    arch: Arch,
    in_shapes: Mapping[str, ShapeSpec],
    num_classes: int,
    recipe: Recipe | None,
    width: int = 256,
) -> tuple[nn.Module, nn.Module]:
    """(fpn, head) for ``arch`` over backbone outputs declared by ``in_shapes``.

    ``fpn(features) -> [P3..P7]`` each (N, width, H_l, W_l); ``head([P3..P7]) -> {"cls_logits",
    "bbox_reg", "centerness"}`` lists of per-level maps. ``recipe`` (or None for the authors'
    settings) decides the head's box activation and which tower feeds centerness.
    """
    if width < 32:  # GroupNorm(32) in the heads; 0 or less fails deep inside torch otherwise
        raise UserError(f"model.width={width}: the decoder width must be a positive multiple of 32, e.g. 256")
    return build_fpn(arch, in_shapes, width), build_head(arch, num_classes, recipe, width)


def build_parts(
    arch: Arch,
    num_classes: int,
    recipe: Recipe | None,
    backbone_name: str,
    backbone_weights: str = "none",
    width: int = 256,
    frozen_stages: int = 1,
    levels: Sequence[str] | None = None,
    norm: str = "frozen_bn",
) -> tuple[Backbone, nn.Module, nn.Module]:
    """(backbone, fpn, head): the backbone returns ``backbone_levels(arch, levels)``."""
    backbone = build_backbone(
        backbone_name,
        weights=backbone_weights,
        frozen_stages=frozen_stages,
        norm=norm,
        levels=backbone_levels(arch, levels),
    )
    fpn, head = build_decoder(arch, backbone.output_shapes(), num_classes, recipe, width)
    return backbone, fpn, head


def build_detector(
    arch: Arch,
    num_classes: int,
    recipe: Recipe,
    backbone_name: str,
    backbone_weights: str = "none",
    width: int = 256,
    frozen_stages: int = 1,
    levels: Sequence[str] | None = None,
    norm: str = "frozen_bn",
) -> FCOS:
    """A full FCOS detector for ``arch``. ``backbone_weights``: ``none``, ``imagenet`` or a file.

    ``levels``: backbone levels to return beyond what the arch needs (default c3-c5; c2 is added
    when the FPN reads it).
    """
    backbone, fpn, head = build_parts(
        arch, num_classes, recipe, backbone_name, backbone_weights, width, frozen_stages, levels, norm
    )
    return FCOS(backbone, fpn, head, num_classes, recipe)


def build_detector_from_cfg(cfg: Any, arch: Arch) -> FCOS:
    """A full FCOS detector for ``arch`` from the config contract.

    Reads ``cfg.backbone.{name, weights, frozen_stages, norm}`` (and ``levels`` if present; ``auto``
    freezing resolved by :func:`~detector.backbone.resolve_freezing`),
    ``cfg.recipe`` (:meth:`Recipe.from_cfg`), ``cfg.data.num_classes`` and ``cfg.model.width``.
    """
    backbone_cfg = cfg.backbone
    levels = backbone_cfg.get("levels") if hasattr(backbone_cfg, "get") else None
    weights = backbone_cfg.weights if backbone_cfg.weights is not None else "none"
    frozen_stages, norm = resolve_freezing(weights, backbone_cfg.frozen_stages, backbone_cfg.norm)
    return build_detector(
        arch,
        num_classes=int(cfg.data.num_classes),
        recipe=Recipe.from_cfg(cfg.recipe),
        backbone_name=str(backbone_cfg.name),
        backbone_weights=str(weights),
        width=int(cfg.model.width),
        frozen_stages=int(frozen_stages),
        levels=tuple(levels) if levels is not None else None,
        norm=norm,
    )
