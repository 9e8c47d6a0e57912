"""``python -m detector describe``: parameters per part and GFLOPs of a detector, without weights
(the counting conventions are in :mod:`detector.model.cost`)."""
from __future__ import annotations

import json
from typing import Any

from detector.arch.grammar import ArchError
from detector.errors import UserError
from detector.model.cost import DEFAULT_INPUT_SIZE, describe

FORMATS = ("text", "json")


def format_table(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`detector.model.cost.describe`'s result."""
    height, width_px = info["input_size"]
    lines = [
        f"arch         {info['arch']}",
        f"backbone     {info['backbone']}   classes {info['num_classes']}   width {info['width']}   "
        f"recipe {info['recipe'] or 'authors (default)'}",
        f"input        {height} x {width_px}, batch 1",
        "",
        f"{'part':<10}{'params':>14}{'GFLOPs':>12}",
    ]
    for part in ("backbone", "fpn", "head"):
        lines.append(f"{part:<10}{info['params'][part]:>14,}{info['gflops_per_part'][part]:>12.2f}")
    lines.append(f"{'total':<10}{info['params']['total']:>14,}{info['gflops']:>12.2f}")
    lines += ["", f"GFLOPs = 2 x multiply-accumulates / 1e9 ({info['gmacs']:.2f} GMACs, the unit of "
                  "mmdetection/fvcore 'FLOPs' tables); deformable convs counted as dense convs."]
    return "\n".join(lines)


def describe_command(cfg: Any) -> dict[str, Any]:
    """``describe arch=<code> [format=json] [backbone=...] [input_size=[h,w]]``: print the result.

    Reads ``cfg.arch``, ``cfg.backbone.name``, ``cfg.data.num_classes``, ``cfg.model.width``,
    ``cfg.recipe``, ``cfg.input_size`` and ``cfg.format`` (``text`` or ``json``). Backbone weights
    are never loaded. Returns the dict it printed.
    """
    from detector.model.backbone import BackboneError
    from detector.model.recipe import Recipe, RecipeError
    from detector.arch.zoo import resolve_arch

    output_format = str(cfg.get("format", "text"))
    if output_format not in FORMATS:
        raise UserError(f"format={output_format}: choose one of {', '.join(FORMATS)}")
    input_size = cfg.get("input_size", None)
    try:
        arch = resolve_arch(cfg.arch)
        recipe = Recipe.from_cfg(cfg.recipe) if cfg.get("recipe", None) is not None else None
        model_cfg = cfg.get("model", None)
        width = int(model_cfg.width) if model_cfg is not None and model_cfg.get("width") is not None else 256
        info = describe(
            arch,
            str(cfg.backbone.name),
            int(cfg.data.num_classes),
            input_size=DEFAULT_INPUT_SIZE if input_size is None else input_size,
            recipe=recipe,
            width=width,
        )
    except (ArchError, RecipeError, BackboneError) as err:
        raise UserError(str(err)) from None
    print(json.dumps(info) if output_format == "json" else format_table(info))
    return info
