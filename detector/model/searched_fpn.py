"""The searched FPN: a :class:`detector.arch.grammar.SearchedFPN` code turned into a module.

Built from declared backbone shapes (DESIGN section 4):

1. Each backbone level the code reads gets an adapter: 1x1 conv (no bias) -> BN -> ReLU, from the
   level's channels to the decoder width. Levels no block reads get no adapter.
2. Block k applies its two unary ops to its two inputs *at their own resolutions*, bilinearly
   upsamples the coarser result to the finer one's size, aggregates, and appends the output to
   the pool (resolution is not searched: a block outputs at the finer of its inputs' strides).
3. Outputs (``SearchedFPN.outputs()``): the last three unused block outputs are P5, P4, P3;
   every other unused output is resized (bilinear) and added into each of them; then P5, P4, P3
   are resized to the sizes of C5, C4, C3 (which can be a downsample). P6 = 3x3 stride-2 conv
   (with bias) on P5, P7 = the same on ReLU(P6); no norm on P6/P7.

All resizing is ``F.interpolate(mode="bilinear", align_corners=False)``, as in the authors' code.
"""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from detector.arch.grammar import FPNBlock, SearchedFPN
from detector.model.backbone import ShapeSpec
from detector.errors import UserError
from detector.model.ops import build_aggregation, build_fpn_op

OUTPUT_SIZE_LEVELS = ("c5", "c4", "c3")  # P5, P4, P3 take the sizes of these backbone levels
OUTPUT_STRIDES = (8, 16, 32, 64, 128)  # P3..P7


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, *size); returns x itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adapter(in_channels: int, width: int) -> nn.Module:
    """1x1 conv (no bias) -> BN -> ReLU: a backbone level to the decoder width."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


class FPNCell(nn.Module):
    """One block: op on each input, upsample the coarser to the finer, aggregate."""

    resize = staticmethod(resize_to)  # the ``resize`` fast path swaps in detector.fast.fpn.resize_gemm

    def __init__(self, block: FPNBlock, width: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList([build_fpn_op(name, width) for name in block.ops])
        self.agg = build_aggregation(block.agg, width)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # x: (N, w, Hx, Wx), y: (N, w, Hy, Wy); the output has the larger of the two sizes.
        x, y = self.ops[0](x), self.ops[1](y)
        if x.shape[-2] * x.shape[-1] >= y.shape[-2] * y.shape[-1]:
            y = self.resize(y, x.shape[-2:])
        else:
            x = self.resize(x, y.shape[-2:])
        return self.agg(x, y)


class SearchedFPNModule(nn.Module):
    """Searched FPN over backbone features.

    Args:
        fpn_code: the validated code.
        in_shapes: the backbone's declared outputs, level name -> ShapeSpec(channels, stride).
            Must hold c3, c4, c5 (their sizes set P3-P5) and every level the code reads
            (c2 only if the code reads it). Checked here, before any module is built.
        width: decoder width (channels of every block and of P3-P7).
    """

    resize = staticmethod(resize_to)  # the ``resize`` fast path swaps in detector.fast.fpn.resize_gemm

    def __init__(self, fpn_code: SearchedFPN, in_shapes: Mapping[str, ShapeSpec], width: int = 256) -> None:
        super().__init__()
        if not isinstance(fpn_code, SearchedFPN):
            raise TypeError(f"SearchedFPNModule needs a SearchedFPN code, got {type(fpn_code).__name__}")
        needed = sorted(set(fpn_code.levels_read()) | set(OUTPUT_SIZE_LEVELS))
        missing = [level for level in needed if level not in in_shapes]
        if missing:
            raise UserError(
                f"fpn '{fpn_code}' needs backbone level(s) {', '.join(missing)} but the backbone only "
                f"provides {', '.join(sorted(in_shapes)) or 'none'}; build the backbone with those levels "
                "or use a code that reads only the levels it has"
            )
        self.code = fpn_code
        self.width = width
        self.plan = fpn_code.outputs()
        self.adapters = nn.ModuleDict(
            {level: adapter(in_shapes[level].channels, width) for level in fpn_code.levels_read()}
        )
        self.cells = nn.ModuleList([FPNCell(block, width) for block in fpn_code.blocks])
        self.p6 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def output_shapes(self) -> list[ShapeSpec]:
        """Channels and stride of P3..P7."""
        return [ShapeSpec(self.width, stride) for stride in OUTPUT_STRIDES]

    def forward(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """{"c3": (N, C3, H/8, W/8), "c4": ..., "c5": ...} -> [P3, P4, P5, P6, P7], each (N, width, H_l, W_l).

        P3, P4, P5 have the spatial sizes of C3, C4, C5; P6 and P7 halve P5 and P6 (rounding up).
        """
        pool: dict[str, Tensor] = {level: self.adapters[level](features[level]) for level in self.adapters}
        outputs: list[Tensor] = []
        for k, (block, cell) in enumerate(zip(self.code.blocks, self.cells)):
            x, y = (pool[name] for name in block.inputs)
            out = cell(x, y)  # (N, w, H_k, W_k)
            pool[f"b{k}"] = out
            outputs.append(out)

        pyramid = []
        for index, level in zip((self.plan.p5, self.plan.p4, self.plan.p3), OUTPUT_SIZE_LEVELS):
            merged = outputs[index]
            for extra in self.plan.extras:
                merged = merged + self.resize(outputs[extra], merged.shape[-2:])
            pyramid.append(self.resize(merged, features[level].shape[-2:]))
        p5, p4, p3 = pyramid
        p6 = self.p6(p5)  # (N, w, H/64, W/64)
        p7 = self.p7(F.relu(p6))  # (N, w, H/128, W/128)
        return [p3, p4, p5, p6, p7]
