"""Training and inference recipe of an FCOS detector: target assignment, losses, post-processing.

Two recipes ship in ``conf/recipe/``: ``nasfcos`` (the NAS-FCOS authors' FCOS: no center sampling,
-log IoU weighted by the centerness target, distances in pixels from exp(scale * x), centerness on
the classification tower) and ``torchvision`` (torchvision's FCOS: center sampling 1.5, GIoU, ReLU
distances normalised by the level's anchor size, centerness on the regression tower).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from detector.errors import UserError


class RecipeError(UserError):
    """A recipe config has a missing, unknown or out-of-range field."""


NUM_PYRAMID_LEVELS = 5  # P3..P7
_CHOICES = {
    "box_coding": ("pixels", "linear_by_size"),
    "box_activation": ("exp_scale", "relu"),
    "centerness_on": ("cls", "reg"),
    "box_loss": ("iou", "giou"),
    "threshold_on": ("cls", "score"),
    "score_formula": ("product", "sqrt_product"),
}


@dataclass(frozen=True)
class Recipe:
    """Every knob that differs between FCOS implementations, as one hashable value.

    point_offset: points sit at ``(i + point_offset) * stride`` (0.5 FCOS, 0.0 torchvision).
    center_sampling_radius: a point must lie within ``radius * stride`` of the box center (None: off).
    size_ranges: per pyramid level, the allowed ``max(l, t, r, b)`` of a positive point, in pixels.
    size_range_inclusive: bounds compare with ``>=``/``<=`` (FCOS) or ``>``/``<`` (torchvision).
    box_coding: regression outputs are distances in ``pixels`` or in units of the level's
        anchor size (``linear_by_size``: 8 * 2**level).
    box_activation / centerness_on: how the FCOS head is built (see ``FCOSHead``).
    box_loss: ``iou`` (-log IoU weighted by the centerness target, normalised by its sum) or
        ``giou`` (1 - GIoU summed over positives, normalised by their number).
    threshold_on: ``score_thresh`` applies to the class probability (``cls``) or the final score.
    score_formula: final score ``sigmoid(cls) * sigmoid(ctr)`` (``product``) or its square root.
    """

    name: str
    point_offset: float
    center_sampling_radius: float | None
    size_ranges: tuple[tuple[float, float], ...]
    size_range_inclusive: bool
    box_coding: str
    box_activation: str
    centerness_on: str
    box_loss: str
    focal_alpha: float
    focal_gamma: float
    score_thresh: float
    threshold_on: str
    score_formula: str
    topk_per_level: int
    nms_thresh: float
    detections_per_image: int

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"recipe.{key}='{getattr(self, key)}' is not one of {', '.join(allowed)}")
        if self.center_sampling_radius is not None and self.center_sampling_radius < 0:
            raise RecipeError(f"recipe.center_sampling_radius={self.center_sampling_radius}: "
                              "expected a positive number, or null/0 for no center sampling")
        if len(self.size_ranges) != NUM_PYRAMID_LEVELS:
            raise RecipeError(f"recipe.size_ranges has {len(self.size_ranges)} ranges; give one [low, high] "
                              f"per pyramid level P3..P7 ({NUM_PYRAMID_LEVELS})")
        for low, high in self.size_ranges:
            if not 0 <= low < high:
                raise RecipeError(f"recipe.size_ranges: range [{low}, {high}] must satisfy 0 <= low < high")
        if not 0 <= self.score_thresh < 1 or not 0 < self.nms_thresh <= 1:
            raise RecipeError(f"recipe: score_thresh={self.score_thresh} must be in [0, 1) and "
                              f"nms_thresh={self.nms_thresh} in (0, 1]")
        if self.topk_per_level < 1 or self.detections_per_image < 1:
            raise RecipeError("recipe: topk_per_level and detections_per_image must be >= 1")

    @property
    def center_sampling(self) -> bool:
        return bool(self.center_sampling_radius)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "Recipe":
        """Build from ``cfg.recipe`` (an OmegaConf node or a plain mapping with exactly our fields)."""
        if not isinstance(cfg, Mapping):
            from omegaconf import OmegaConf  # only needed for config nodes

            cfg = OmegaConf.to_container(cfg, resolve=True)
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(cfg)), sorted(set(cfg) - names)
        if missing or unknown:
            raise RecipeError(f"recipe: missing fields {missing}, unknown fields {unknown}; "
                              "see conf/recipe/nasfcos.yaml for the full list")
        values = dict(cfg)
        try:
            values["size_ranges"] = tuple((float(low), float(high)) for low, high in cfg["size_ranges"])
            radius = cfg["center_sampling_radius"]
            values["center_sampling_radius"] = float(radius) if radius else None
            for key in ("point_offset", "focal_alpha", "focal_gamma", "score_thresh", "nms_thresh"):
                values[key] = float(cfg[key])
            for key in ("topk_per_level", "detections_per_image"):
                values[key] = int(cfg[key])
        except (TypeError, ValueError) as error:
            raise RecipeError(f"recipe: a numeric field has a bad value ({error}); size_ranges is a "
                              "list of [low, high] pairs (high may be .inf)") from error
        values["size_range_inclusive"] = bool(cfg["size_range_inclusive"])
        return cls(**values)

