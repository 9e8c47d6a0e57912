"""The searched head: a :class:`detector.arch.grammar.SearchedHead` code turned into a module.

Structure (DESIGN section 4, authors' ``MicroHead_v2``):

- the chain of ops is built twice, a classification tower and a regression tower, with separate
  weights;
- sharing index ``share = k``: the first k layers of each tower are separate per pyramid level
  (``num_levels`` copies), the remaining layers are shared by all levels. As in the authors' code
  the per-level copies of a layer start from identical weights (one layer built, then copied);
- predictors (3x3 convs with bias, weights normal(0, 0.01), bias 0): class logits from the cls
  tower (bias = -log((1 - p) / p) with prior p = 0.01), 4 box distances from the reg tower, and
  centerness from the cls tower (``centerness_on="cls"``, the authors' choice) or the reg tower;
- box output (``box_activation``): ``exp_scale`` = exp(s_l * x) with one learnable scale per level
  (init 1), computed in float32 -- the authors' head; ``relu`` = ReLU(x), no scales -- for the
  torchvision recipe, whose loss expects that coding.

Tower ops keep their default initialisation (the authors initialise only the predictors), so a
``dcn`` layer's offset predictor stays at zero.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from detector.arch.grammar import SearchedHead
from detector.errors import UserError
from detector.model.ops import GN_GROUPS, build_head_op

BOX_ACTIVATIONS = ("exp_scale", "relu")
CENTERNESS_ON = ("cls", "reg")
PRIOR_PROB = 0.01


def predictor(width: int, out_channels: int, bias: float = 0.0) -> nn.Conv2d:
    """3x3 conv with bias, normal(0, 0.01) weights."""
    conv = nn.Conv2d(width, out_channels, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


class SearchedTower(nn.Module):
    """One tower: ``share`` per-level layers, then the rest of the chain shared by all levels."""

    def __init__(self, head_code: SearchedHead, width: int, num_levels: int) -> None:
        super().__init__()
        per_level_ops = head_code.ops[: head_code.share]
        shared_ops = head_code.ops[head_code.share:]
        # Per level: the same freshly built layers, copied, so every level starts from equal weights.
        template = nn.Sequential(*(build_head_op(name, width) for name in per_level_ops))
        self.per_level = nn.ModuleList([copy.deepcopy(template) for _ in range(num_levels)]) if per_level_ops else None
        self.shared = nn.Sequential(*(build_head_op(name, width) for name in shared_ops))

    def forward(self, x: Tensor, level: int) -> Tensor:
        # (N, w, H_l, W_l) -> (N, w, H_l, W_l)
        if self.per_level is not None:
            x = self.per_level[level](x)
        return self.shared(x)


class SearchedHeadModule(nn.Module):
    """Searched FCOS head over ``num_levels`` pyramid levels.

    Args:
        head_code: the validated code.
        width: channels of the FPN outputs (divisible by 32: every op has GroupNorm(32)).
        num_classes: number of object classes (no background class).
        num_levels: pyramid levels (P3-P7: 5).
        box_activation: ``exp_scale`` (authors) or ``relu`` (torchvision recipe).
        centerness_on: ``cls`` (authors) or ``reg``: the tower the centerness predictor reads.
    """

    def __init__(
        self,
        head_code: SearchedHead,
        width: int,
        num_classes: int,
        num_levels: int = 5,
        box_activation: str = "exp_scale",
        centerness_on: str = "cls",
    ) -> None:
        super().__init__()
        if not isinstance(head_code, SearchedHead):
            raise TypeError(f"SearchedHeadModule needs a SearchedHead code, got {type(head_code).__name__}")
        if width % GN_GROUPS != 0:
            raise UserError(f"searched head: width {width} must be divisible by {GN_GROUPS} (GroupNorm groups); "
                            "set model.width to a multiple of 32")
        if num_classes < 1 or num_levels < 1:
            raise ValueError(f"searched head: num_classes ({num_classes}) and num_levels ({num_levels}) must be >= 1")
        if box_activation not in BOX_ACTIVATIONS:
            raise ValueError(f"searched head: box_activation '{box_activation}' is not one of {BOX_ACTIVATIONS}")
        if centerness_on not in CENTERNESS_ON:
            raise ValueError(f"searched head: centerness_on '{centerness_on}' is not one of {CENTERNESS_ON}")
        self.code = head_code
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.box_activation = box_activation
        self.centerness_on = centerness_on
        self.cls_tower = SearchedTower(head_code, width, num_levels)
        self.reg_tower = SearchedTower(head_code, width, num_levels)
        self.cls_logits = predictor(width, num_classes, bias=-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        self.bbox_pred = predictor(width, 4)
        self.centerness = predictor(width, 1)
        self.scales = nn.Parameter(torch.ones(num_levels)) if box_activation == "exp_scale" else None

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """[P3..P7], each (N, w, H_l, W_l) -> per-level predictions.

        Returns {"cls_logits": [(N, num_classes, H_l, W_l)], "bbox_reg": [(N, 4, H_l, W_l)] non-negative
        distances (l, t, r, b) in the recipe's box coding, "centerness": [(N, 1, H_l, W_l)] logits}.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"searched head: expected {self.num_levels} feature levels, got {len(features)}")
        cls_logits, bbox_reg, centerness = [], [], []
        for level, feature in enumerate(features):
            cls_feat = self.cls_tower(feature, level)  # (N, w, H_l, W_l)
            reg_feat = self.reg_tower(feature, level)  # (N, w, H_l, W_l)
            cls_logits.append(self.cls_logits(cls_feat))
            box = self.bbox_pred(reg_feat)  # (N, 4, H_l, W_l)
            if self.scales is not None:
                box = torch.exp(self.scales[level] * box.float())
            else:
                box = torch.relu(box)
            bbox_reg.append(box)
            centerness.append(self.centerness(cls_feat if self.centerness_on == "cls" else reg_feat))
        return {"cls_logits": cls_logits, "bbox_reg": bbox_reg, "centerness": centerness}
