"""The hand-made FCOS head (``head:fcos``): two conv towers shared across pyramid levels.

Each tower is ``num_convs`` x (3x3 conv with bias -> GroupNorm(32) -> ReLU). Predictors are 3x3
convs: class logits (bias prior 0.01) on the classification tower, four box distances on the
regression tower, and centerness on either tower. All weights normal(0, 0.01), biases 0, as in
torchvision's FCOSHead; with ``centerness_on="reg", box_activation="relu"`` the parameters are
exactly torchvision's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detector.errors import UserError

CENTERNESS_ON = ("cls", "reg")
BOX_ACTIVATIONS = ("exp_scale", "relu")
GROUPNORM_GROUPS = 32
PRIOR_PROBABILITY = 0.01


def _tower(width: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(width, width, kernel_size=3, padding=1),
                   nn.GroupNorm(GROUPNORM_GROUPS, width), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """forward([P3..P7]) -> {"cls_logits", "bbox_reg", "centerness"}: per-level lists.

    cls_logits: (N, num_classes, H_l, W_l) logits; bbox_reg: (N, 4, H_l, W_l) non-negative
    distances (l, t, r, b) in the recipe's units (``exp_scale``: exp(s_l * x) with a learnable scale
    per level; ``relu``: relu(x)); centerness: (N, 1, H_l, W_l) logits.
    """

    def __init__(self, width: int, num_classes: int, num_convs: int = 4, centerness_on: str = "cls",
                 box_activation: str = "exp_scale", num_levels: int = 5) -> None:
        super().__init__()
        if centerness_on not in CENTERNESS_ON:
            raise UserError(f"FCOSHead: centerness_on='{centerness_on}' is not one of {CENTERNESS_ON}")
        if box_activation not in BOX_ACTIVATIONS:
            raise UserError(f"FCOSHead: box_activation='{box_activation}' is not one of {BOX_ACTIVATIONS}")
        if width % GROUPNORM_GROUPS:
            raise UserError(f"FCOSHead: width={width} must be a multiple of {GROUPNORM_GROUPS} (GroupNorm)")
        if num_classes < 1:
            raise UserError(f"FCOSHead: num_classes={num_classes} must be >= 1")
        self.num_classes, self.num_levels = num_classes, num_levels
        self.centerness_on, self.box_activation = centerness_on, box_activation
        self.cls_tower = _tower(width, num_convs)
        self.reg_tower = _tower(width, num_convs)
        self.cls_logits = nn.Conv2d(width, num_classes, kernel_size=3, padding=1)
        self.bbox_reg = nn.Conv2d(width, 4, kernel_size=3, padding=1)
        self.centerness = nn.Conv2d(width, 1, kernel_size=3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        if box_activation == "exp_scale":
            self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """features: [(N, width, H_l, W_l)] for P3..P7 -> per-level prediction lists."""
        if self.box_activation == "exp_scale" and len(features) != self.num_levels:
            raise ValueError(f"FCOSHead: got {len(features)} feature maps, built for {self.num_levels}")
        outputs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_reg": [], "centerness": []}
        for level, feature in enumerate(features):
            cls_feature = self.cls_tower(feature)  # (N, width, H, W)
            reg_feature = self.reg_tower(feature)  # (N, width, H, W)
            distances = self.bbox_reg(reg_feature)  # (N, 4, H, W)
            if self.box_activation == "exp_scale":
                # exp in float32: under autocast exp of fp16 overflows for moderate inputs
                distances = torch.exp(self.scales[level].float() * distances.float())
            else:
                distances = F.relu(distances)
            outputs["cls_logits"].append(self.cls_logits(cls_feature))  # (N, C, H, W)
            outputs["bbox_reg"].append(distances)
            ctr_feature = cls_feature if self.centerness_on == "cls" else reg_feature
            outputs["centerness"].append(self.centerness(ctr_feature))  # (N, 1, H, W)
        return outputs
