"""Points of the feature pyramid: one location per feature-map cell, in padded-image pixels.

Points are flattened level by level, each level row-major (y outer, x inner), which is the order
in which ``flatten_head_outputs`` lays out head predictions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PYRAMID_STRIDES = (8, 16, 32, 64, 128)  # P3..P7; also torchvision's anchor sizes


@dataclass(frozen=True)
class Points:
    """All points of one pyramid, shared by every image of a batch.

    xy: (P, 2) point coordinates (x, y) in padded-image pixels.
    strides: (P,) stride of each point's level (float, the box-coding unit of linear_by_size).
    levels: (P,) int64 pyramid level index of each point (0 = P3).
    num_per_level: number of points on each level, sums to P.
    """

    xy: Tensor
    strides: Tensor
    levels: Tensor
    num_per_level: tuple[int, ...]


def make_points(feature_sizes: list[tuple[int, int]], offset: float,
                strides: tuple[int, ...] = PYRAMID_STRIDES, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Points:
    """Points at ``((j + offset) * s, (i + offset) * s)`` for every cell (i, j) of every level."""
    if len(feature_sizes) != len(strides):
        raise ValueError(f"make_points: {len(feature_sizes)} feature maps but {len(strides)} strides; "
                         "the FPN must return one map per stride (P3..P7)")
    all_xy, all_strides, all_levels = [], [], []
    for level, ((height, width), stride) in enumerate(zip(feature_sizes, strides)):
        xs = (torch.arange(width, device=device, dtype=dtype) + offset) * stride  # (W,)
        ys = (torch.arange(height, device=device, dtype=dtype) + offset) * stride  # (H,)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        all_xy.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))  # (H*W, 2)
        all_strides.append(torch.full((height * width,), float(stride), device=device, dtype=dtype))
        all_levels.append(torch.full((height * width,), level, device=device, dtype=torch.int64))
    return Points(
        xy=torch.cat(all_xy),
        strides=torch.cat(all_strides),
        levels=torch.cat(all_levels),
        num_per_level=tuple(h * w for h, w in feature_sizes),
    )


def points_for(features: list[Tensor], offset: float) -> Points:
    """Points for a list of pyramid maps ``[(N, C, H_l, W_l)]`` at strides 8..128."""
    sizes = [(f.shape[-2], f.shape[-1]) for f in features]
    return make_points(sizes, offset, device=features[0].device)


def flatten_head_outputs(head_out: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-level head maps -> point-major tensors in ``Points`` order.

    Returns cls_logits (N, P, C), bbox_reg (N, P, 4), centerness (N, P).
    """
    def flat(maps: list[Tensor]) -> Tensor:
        # (N, K, H, W) -> (N, H*W, K), then concatenated over levels
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

    return flat(head_out["cls_logits"]), flat(head_out["bbox_reg"]), flat(head_out["centerness"])[..., 0]
