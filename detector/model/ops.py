"""Op tables of the two search spaces (DESIGN section 4): op name -> constructor.

Every constructor takes the decoder width and returns a module; names are exactly the op names
of the code grammar (``detector.arch.grammar.FPN_OPS``, ``AGGREGATIONS``, ``HEAD_OPS``). Adding an op is
one line in a table (plus its name in ``detector.arch.grammar``); the tests iterate over the tables.

- ``FPN_OP_TABLE``: unary ops ``(N, w, H, W) -> (N, w, H, W)``, stride 1, BatchNorm + ReLU.
- ``AGGREGATION_TABLE``: binary ops ``(x, y) -> z``, both ``(N, w, H, W)`` of the same size
  (the FPN cell resizes before aggregating).
- ``HEAD_OP_TABLE``: unary ops ``(N, w, H, W) -> (N, w, H, W)``, GroupNorm(32) + ReLU.

Details that decide whether the published architecture replays (authors' layer factory):

- separable convs are depthwise KxK (no bias, dilation d, 'same' padding d*(K-1)/2) -> pointwise
  1x1 (no bias) -> norm -> ReLU; ``sep5d6`` is 5x5 with dilation 6 (padding 12);
- ``dcn`` is :class:`detector.model.deform.ModulatedDeformConv` (3x3, 2 offset groups, with bias,
  zero-initialised offset/mask predictor) -> norm -> ReLU;
- ``skip`` is the identity in *both* spaces: no norm, no ReLU, no parameters (the authors' head
  skip is a pure identity too, so a head chain of skips passes the FPN output straight through);
- ``cat`` = concat -> BN(2w) -> ReLU -> 1x1 conv 2w -> w with ``groups=w`` and no bias. With
  ``groups=w`` output channel i sees only input channels 2i and 2i+1, i.e. the first half of the
  outputs sees only x and the second half only y. This quirk is the authors' design; keep it;
- ``sum`` = a*x + b*y with learnable per-channel a, b initialised to 1;
- head ``conv1`` / ``conv3`` have no bias (a GroupNorm follows);
- weights of these ops keep PyTorch's default initialisation, as in the authors' code (only the
  head predictors and P6/P7 get explicit initialisations, in their own modules).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from detector.model.deform import ModulatedDeformConv
from detector.errors import UserError

GN_GROUPS = 32

OpConstructor = Callable[[int], nn.Module]


def batch_norm(width: int) -> nn.Module:
    return nn.BatchNorm2d(width)


def group_norm(width: int) -> nn.Module:
    if width % GN_GROUPS != 0:
        raise UserError(f"GroupNorm({GN_GROUPS}) needs a width divisible by {GN_GROUPS}, got {width}; "
                        "set model.width to a multiple of 32")
    return nn.GroupNorm(GN_GROUPS, width)


def separable_conv(width: int, kernel_size: int, dilation: int, norm: OpConstructor) -> nn.Module:
    """Depthwise KxK (dilated, no bias) -> pointwise 1x1 (no bias) -> norm -> ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size, padding=padding, dilation=dilation, groups=width, bias=False),
        nn.Conv2d(width, width, 1, bias=False),
        norm(width),
        nn.ReLU(inplace=True),
    )


def plain_conv(width: int, kernel_size: int, norm: OpConstructor) -> nn.Module:
    """KxK conv (no bias) -> norm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, bias=False),
        norm(width),
        nn.ReLU(inplace=True),
    )


def deformable_conv(width: int, norm: OpConstructor) -> nn.Module:
    """DCNv2 3x3, 2 offset groups, with bias -> norm -> ReLU."""
    return nn.Sequential(ModulatedDeformConv(width, width, 3, offset_groups=2), norm(width), nn.ReLU(inplace=True))


class WeightedSum(nn.Module):
    """``sum``: a * x + b * y with learnable per-channel a, b (init 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(width))
        self.b = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # x, y: (N, w, H, W)
        return self.a[None, :, None, None] * x + self.b[None, :, None, None] * y


class ConcatReduce(nn.Module):
    """``cat``: concat (2w) -> BN -> ReLU -> grouped 1x1 conv 2w -> w (groups=w, no bias)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, width, 1, groups=width, bias=False),
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.reduce(torch.cat([x, y], dim=1))  # (N, 2w, H, W) -> (N, w, H, W)


FPN_OP_TABLE: dict[str, OpConstructor] = {
    "sep3": lambda w: separable_conv(w, 3, 1, batch_norm),
    "sep3d3": lambda w: separable_conv(w, 3, 3, batch_norm),
    "sep5d6": lambda w: separable_conv(w, 5, 6, batch_norm),
    "skip": lambda w: nn.Identity(),
    "dcn": lambda w: deformable_conv(w, batch_norm),
}

AGGREGATION_TABLE: dict[str, OpConstructor] = {
    "sum": WeightedSum,
    "cat": ConcatReduce,
}

HEAD_OP_TABLE: dict[str, OpConstructor] = {
    "conv1": lambda w: plain_conv(w, 1, group_norm),
    "conv3": lambda w: plain_conv(w, 3, group_norm),
    "sep3": lambda w: separable_conv(w, 3, 1, group_norm),
    "sep3d3": lambda w: separable_conv(w, 3, 3, group_norm),
    "skip": lambda w: nn.Identity(),
    "dcn": lambda w: deformable_conv(w, group_norm),
}


def _lookup(table: dict[str, OpConstructor], kind: str, name: str) -> OpConstructor:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} '{name}'; choose one of {', '.join(table)}") from None


def build_fpn_op(name: str, width: int) -> nn.Module:
    return _lookup(FPN_OP_TABLE, "FPN op", name)(width)


def build_aggregation(name: str, width: int) -> nn.Module:
    return _lookup(AGGREGATION_TABLE, "aggregation", name)(width)


def build_head_op(name: str, width: int) -> nn.Module:
    return _lookup(HEAD_OP_TABLE, "head op", name)(width)
