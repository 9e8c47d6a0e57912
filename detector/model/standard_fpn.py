"""The hand-made FPN of FCOS (``fpn:standard``), built like torchvision's fcos_resnet50_fpn FPN.

C3..C5 each get a 1x1 lateral conv; a top-down path adds the nearest-upsampled coarser lateral;
a 3x3 conv smooths each sum into P3..P5. P6 is a 3x3 stride-2 conv on P5 and P7 the same on
ReLU(P6) (torchvision's ``LastLevelP6P7`` with equal in/out channels). All convs have a bias and
torchvision's init (kaiming uniform a=1, zero bias), so parameter count and state dict match.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from detector.model.backbone import ShapeSpec
from detector.errors import UserError

FPN_INPUT_LEVELS = ("c3", "c4", "c5")
FPN_OUTPUT_STRIDES = (8, 16, 32, 64, 128)


class StandardFPN(nn.Module):
    """forward({"c3", "c4", "c5": (N, C_l, H_l, W_l)}) -> [P3, ..., P7], each (N, width, H_l, W_l)."""

    def __init__(self, in_shapes: dict[str, ShapeSpec], width: int = 256) -> None:
        super().__init__()
        missing = [level for level in FPN_INPUT_LEVELS if level not in in_shapes]
        if missing:
            raise UserError(f"StandardFPN needs backbone levels {list(FPN_INPUT_LEVELS)}, missing {missing}; "
                             "set backbone.levels to include them")
        for level, stride in zip(FPN_INPUT_LEVELS, FPN_OUTPUT_STRIDES):
            if in_shapes[level].stride != stride:
                raise UserError(f"StandardFPN: backbone level {level} has stride {in_shapes[level].stride}, "
                                 f"expected {stride}")
        self.width = width
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(in_shapes[level].channels, width, kernel_size=1) for level in FPN_INPUT_LEVELS)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1) for _ in FPN_INPUT_LEVELS)
        self.p6 = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def output_shapes(self) -> list[ShapeSpec]:
        return [ShapeSpec(self.width, stride) for stride in FPN_OUTPUT_STRIDES]

    def forward(self, features: dict[str, Tensor]) -> list[Tensor]:
        """features: {level: (N, C_l, H_l, W_l)} with at least c3..c5 -> [P3..P7] (N, width, ., .)."""
        laterals = [conv(features[level]) for conv, level in zip(self.lateral_convs, FPN_INPUT_LEVELS)]
        merged = laterals[-1]  # (N, width, H5, W5)
        outputs = [self.output_convs[-1](merged)]
        for index in range(len(laterals) - 2, -1, -1):
            top_down = F.interpolate(merged, size=laterals[index].shape[-2:], mode="nearest")
            merged = laterals[index] + top_down  # (N, width, H_l, W_l)
            outputs.insert(0, self.output_convs[index](merged))
        p6 = self.p6(outputs[-1])  # (N, width, ceil(H5/2), ceil(W5/2))
        p7 = self.p7(F.relu(p6))  # (N, width, ceil(H6/2), ceil(W6/2))
        return outputs + [p6, p7]
