"""Cost of a detector without weights: parameters per part and FLOPs, built on the meta device.

Parts (DESIGN section 2): ``backbone`` = the feature extractor up to the levels the FPN reads;
``fpn`` = every parameter between the backbone outputs and the head inputs (adapters, cells,
lateral/output convs, P6/P7); ``head`` = towers, predictors and per-level scales. Parameters are
``nn.Parameter`` elements, frozen ones included; frozen BatchNorm statistics and affine terms are
buffers and are not counted.

FLOP convention: **GFLOPs = 2 x multiply-accumulates / 1e9** for one image of exactly
``input_size`` (no padding), batch 1, inference forward of backbone, FPN and head (no
pre-processing, no post-processing). This is ``torch.utils.flop_counter``'s convention; the
"FLOPs" of mmdetection/fvcore tables are multiply-accumulates, i.e. our ``gmacs`` (half). The
counter does not know ``torchvision::deform_conv2d``; it is counted like a dense convolution of
the same shape (2 * C_in * C_out * K*K * H_out * W_out per image; bilinear sampling and mask
modulation are not counted), and its offset/mask predictor is an ordinary convolution the
counter sees. Only convolutions, matrix products and similar ops are counted, not norms or
activations.

Everything is built on the meta device: no weights, no memory, no download, a fraction of a
second even for ResNet-101 at 800x1333.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from detector.arch.grammar import Arch
from detector.errors import UserError
from detector.model.backbone import ShapeSpec
from detector.model.build import build_decoder, build_parts
from detector.model.recipe import Recipe

DEFAULT_INPUT_SIZE = (800, 1333)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (trainable or frozen)."""
    return sum(p.numel() for p in module.parameters())


def flop_counter() -> FlopCounterMode:
    """A quiet FlopCounterMode that also counts ``torchvision::deform_conv2d``."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    return FlopCounterMode(display=False, custom_mapping={torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops})


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    # Same count as a dense conv: 2 * N * C_out * (C_in / groups) * K*K * H_out * W_out.
    return conv_flop_count(input_shape, weight_shape, out_shape)


@torch.no_grad()
def measure_flops(backbone: nn.Module, fpn: nn.Module, head: nn.Module, image: torch.Tensor) -> dict[str, int]:
    """FLOPs (2 x MACs) of each part for one forward of ``image`` (N, 3, H, W); modules are put in eval mode."""
    for module in (backbone, fpn, head):
        module.eval()
    counts = {}
    with flop_counter() as counter:
        features = backbone(image)
    counts["backbone"] = counter.get_total_flops()
    with flop_counter() as counter:
        pyramid = fpn(features)
    counts["fpn"] = counter.get_total_flops()
    with flop_counter() as counter:
        head(pyramid)
    counts["head"] = counter.get_total_flops()
    return counts


def describe(
    arch: Arch,
    backbone_name: str,
    num_classes: int,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    recipe: Any = None,
    width: int = 256,
) -> dict[str, Any]:
    """Parameters per part and GFLOPs of the detector for ``arch`` (random init, meta device).
    ``recipe`` (a :class:`detector.model.recipe.Recipe`, or None for the authors' head settings) only
    matters for ``head:fcos``, whose per-level scales exist with ``box_activation=exp_scale``.
    Returns a JSON-ready dict: arch, backbone, num_classes, width, input_size, params {backbone,
    fpn, head, total}, gflops, gflops_per_part {backbone, fpn, head}, gmacs, flops_convention.
    """
    height, width_px = _check_input_size(input_size)
    with torch.device("meta"):
        backbone, fpn, head = build_parts(arch, num_classes, recipe, backbone_name, "none", width)
        image = torch.empty(1, 3, height, width_px)
    params = {"backbone": count_parameters(backbone), "fpn": count_parameters(fpn), "head": count_parameters(head)}
    params["total"] = sum(params.values())
    flops = measure_flops(backbone, fpn, head, image)
    total_flops = sum(flops.values())
    return {
        "arch": str(arch),
        "backbone": backbone_name,
        "num_classes": int(num_classes),
        "width": int(width),
        "recipe": getattr(recipe, "name", None),
        "input_size": [height, width_px],
        "params": params,
        "gflops": round(total_flops / 1e9, 3),
        "gflops_per_part": {part: round(value / 1e9, 3) for part, value in flops.items()},
        "gmacs": round(total_flops / 2e9, 3),
        "flops_convention": "gflops = 2 * multiply-accumulates / 1e9, batch 1, forward; gmacs = MACs / 1e9",
    }


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int]:
    try:
        if isinstance(input_size, (str, bytes)):
            raise TypeError("a string is not a pair")
        values = [int(v) for v in input_size]
        ok = len(values) == 2 and all(v >= 32 and float(v) == float(raw) for v, raw in zip(values, input_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"input_size={input_size}: "
                        "expected [height, width], two integers >= 32, e.g. input_size=[800,1333]")
    return values[0], values[1]


def decoder_cost(arch: Arch, shapes: dict[str, ShapeSpec], num_classes: int, recipe: Recipe, width: int,
                 resolution: int) -> tuple[int, float]:
    """(parameters, GFLOPs) of the decoder for one R x R image, built on the meta device.

    Counted on a batch of two (GroupNorm refuses a single value per group, which width 32 gives on
    a 1 x 1 P7) and halved; DCNs run through torchvision's op, which the counter knows.
    """
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
