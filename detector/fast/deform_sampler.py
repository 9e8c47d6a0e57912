"""Steps 1 and 3 of the fast deformable convolution (:mod:`detector.fast.deform`): the geometry of
a call and the samplers that turn input, offsets and masks into columns and scatter column
gradients back.

- :func:`describe_deform_conv` checks the arguments as torchvision does and returns the
  :class:`DeformGeometry`;
- ``torch`` sampler (:data:`TORCH_SAMPLER`): gather / scatter_add on any device, the tested
  reference; coordinates and interpolation weights in float32 (float64 for float64 inputs);
- ``triton`` sampler (:func:`triton_sampler`): fused kernels of :mod:`detector.fast.triton.deform`;
- :func:`resolve_sampler` picks one for a backend name and an input.

Columns are ``(n*L, Gw, K, Cw)``: L output pixels, Gw weight groups of Cw channels, K taps.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class DeformGeometry:
    """Static shape facts of one deformable convolution."""

    height: int
    width: int
    out_height: int
    out_width: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    offset_groups: int
    weight_groups: int

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def out_pixels(self) -> int:
        return self.out_height * self.out_width


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"deform_conv2d_fast: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def describe_deform_conv(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride, padding, dilation,
) -> DeformGeometry:
    """Check the arguments like torchvision does and return the geometry; ValueError if inconsistent."""
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise ValueError(
            "deform_conv2d_fast: input, offset and weight must be 4-D, got "
            f"{tuple(input.shape)}, {tuple(offset.shape)}, {tuple(weight.shape)}"
        )
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"deform_conv2d_fast: need stride >= 1, dilation >= 1, padding >= 0, got {stride}, {dilation}, {padding}"
        )
    batch, channels, height, width = input.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    if group_channels == 0 or channels % group_channels != 0 or out_channels % (channels // group_channels) != 0:
        raise ValueError(
            f"deform_conv2d_fast: weight {tuple(weight.shape)} does not fit {channels} input channels "
            "(in_channels must be a multiple of weight.shape[1], out_channels of the group count)"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if offset_groups == 0 or offset.shape[1] != 2 * taps * offset_groups or channels % offset_groups != 0:
        raise ValueError(
            f"deform_conv2d_fast: offset has {offset.shape[1]} channels; need 2*offset_groups*{taps} "
            f"with offset_groups dividing the {channels} input channels"
        )
    out_height = (height + 2 * padding[0] - (dilation[0] * (kernel_h - 1) + 1)) // stride[0] + 1
    out_width = (width + 2 * padding[1] - (dilation[1] * (kernel_w - 1) + 1)) // stride[1] + 1
    offset_fits = offset.shape[0] == batch and tuple(offset.shape[2:]) == (out_height, out_width)
    if out_height < 1 or out_width < 1 or not offset_fits:
        raise ValueError(
            f"deform_conv2d_fast: offset {tuple(offset.shape)} must be ({batch}, {offset.shape[1]}, "
            f"{out_height}, {out_width}) for input {tuple(input.shape)} and this kernel/stride/padding/dilation"
        )
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * taps, out_height, out_width):
        raise ValueError(
            f"deform_conv2d_fast: mask {tuple(mask.shape)} must be "
            f"({batch}, {offset_groups * taps}, {out_height}, {out_width}) to match the offsets"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"deform_conv2d_fast: bias {tuple(bias.shape)} must be ({out_channels},)")
    return DeformGeometry(
        height, width, out_height, out_width, kernel_h, kernel_w, stride, padding, dilation,
        offset_groups, channels // group_channels,
    )


def _sampling_points(offset: Tensor, geo: DeformGeometry) -> tuple[Tensor, Tensor]:
    """Absolute sampling coordinates y, x, each (n, L, K, G), in the offset's dtype."""
    n, groups, taps, pixels = offset.shape[0], geo.offset_groups, geo.taps, geo.out_pixels
    pairs = offset.reshape(n, groups, taps, 2, pixels).permute(0, 4, 2, 1, 3)  # (n, L, K, G, 2)
    kw = dict(device=offset.device, dtype=offset.dtype)
    rows = torch.arange(geo.out_height, **kw) * geo.stride[0] - geo.padding[0]
    cols = torch.arange(geo.out_width, **kw) * geo.stride[1] - geo.padding[1]
    tap_rows = torch.arange(geo.kernel_h, **kw) * geo.dilation[0]
    tap_cols = torch.arange(geo.kernel_w, **kw) * geo.dilation[1]
    grid_shape = (geo.out_height, geo.out_width, geo.kernel_h, geo.kernel_w)
    base_y = (rows.view(-1, 1, 1, 1) + tap_rows.view(1, 1, -1, 1)).expand(grid_shape).reshape(1, pixels, taps, 1)
    base_x = (cols.view(1, -1, 1, 1) + tap_cols.view(1, 1, 1, -1)).expand(grid_shape).reshape(1, pixels, taps, 1)
    return base_y + pairs[..., 0], base_x + pairs[..., 1]


@dataclass
class _Bilinear:
    """Bilinear corners of sampling points (all (n, L, K, G)), corner order 00, 01, 10, 11 (y, x)."""

    frac_y: Tensor
    frac_x: Tensor
    indices: list[Tensor]  # flat pixel index y*W + x, 0 where the corner is invalid
    valid: list[Tensor]  # bool: corner inside the image
    weights: list[Tensor]  # bilinear weight, not masked, 0 where invalid


def _bilinear_corners(y: Tensor, x: Tensor, height: int, width: int) -> _Bilinear:
    y = y.clamp(-2, height + 1)  # keeps the integer casts finite; only moves all-invalid samples
    x = x.clamp(-2, width + 1)
    y0, x0 = y.floor(), x.floor()
    frac_y, frac_x = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    indices, valid, weights = [], [], []
    for dy, dx, weight in ((0, 0, (1 - frac_y) * (1 - frac_x)), (0, 1, (1 - frac_y) * frac_x),
                           (1, 0, frac_y * (1 - frac_x)), (1, 1, frac_y * frac_x)):
        cy, cx = y0 + dy, x0 + dx
        ok = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        indices.append(torch.where(ok, cy * width + cx, 0))
        valid.append(ok)
        weights.append(weight * ok)
    return _Bilinear(frac_y, frac_x, indices, valid, weights)


def _to_group_layout(columns: Tensor, geo: DeformGeometry) -> Tensor:
    """(rows, K, C) -> (rows, Gw, K, Cw), the GEMM layout."""
    rows, taps, channels = columns.shape
    groups = geo.weight_groups
    return columns.view(rows, taps, groups, channels // groups).transpose(1, 2).contiguous()


def _from_group_layout(columns: Tensor) -> Tensor:
    """(rows, Gw, K, Cw) -> (rows, K, C)."""
    rows, groups, taps, group_channels = columns.shape
    return columns.transpose(1, 2).reshape(rows, taps, groups * group_channels)


def _gather_index(index: Tensor, group_channels: int) -> Tensor:
    n, pixels, taps, groups = index.shape
    return index.reshape(n, pixels * taps, groups, 1).expand(n, pixels * taps, groups, group_channels)


def torch_sample_columns(x_nhwc: Tensor, offset: Tensor, mask: Tensor | None, geo: DeformGeometry) -> Tensor:
    """Modulated bilinear columns (n*L, Gw, K, Cw) in x's dtype from x (n, H, W, C)."""
    n, height, width, channels = x_nhwc.shape
    groups, pixels, taps = geo.offset_groups, geo.out_pixels, geo.taps
    group_channels = channels // groups
    corners = _bilinear_corners(*_sampling_points(offset, geo), height, width)
    source = x_nhwc.reshape(n, height * width, groups, group_channels)
    modulation = _mask_points(mask, geo) if mask is not None else None
    columns = torch.zeros(n, pixels * taps, groups, group_channels, device=x_nhwc.device, dtype=offset.dtype)
    for index, weight in zip(corners.indices, corners.weights):
        if modulation is not None:
            weight = weight * modulation
        values = torch.gather(source, 1, _gather_index(index, group_channels))  # (n, L*K, G, Cg)
        columns.addcmul_(values, weight.reshape(n, pixels * taps, groups, 1))
    return _to_group_layout(columns.to(x_nhwc.dtype).view(n * pixels, taps, channels), geo)


def _mask_points(mask: Tensor, geo: DeformGeometry) -> Tensor:
    n = mask.shape[0]
    return mask.reshape(n, geo.offset_groups, geo.taps, geo.out_pixels).permute(0, 3, 2, 1)  # (n, L, K, G)


def torch_sample_columns_backward(
    grad_columns: Tensor, x_nhwc: Tensor, offset: Tensor, mask: Tensor | None, geo: DeformGeometry,
    grad_x_nhwc: Tensor, grad_offset: Tensor, grad_mask: Tensor | None,
) -> None:
    """Accumulate into grad_x_nhwc (n, H, W, C) and write grad_offset / grad_mask (offset's dtype)."""
    n, height, width, channels = x_nhwc.shape
    groups, pixels, taps = geo.offset_groups, geo.out_pixels, geo.taps
    group_channels = channels // groups
    corners = _bilinear_corners(*_sampling_points(offset, geo), height, width)
    modulation = _mask_points(mask, geo) if mask is not None else None
    grad_cols = _from_group_layout(grad_columns).to(offset.dtype).reshape(n, pixels * taps, groups, group_channels)
    source = x_nhwc.reshape(n, height * width, groups, group_channels)
    grad_source = grad_x_nhwc.view(n, height * width, groups, group_channels)
    corner_sums = []  # per corner: sum over channels of grad_col * input value, (n, L, K, G)
    for index, ok, weight in zip(corners.indices, corners.valid, corners.weights):
        gather_index = _gather_index(index, group_channels)
        values = torch.gather(source, 1, gather_index).to(offset.dtype)
        corner_sums.append((grad_cols * values).sum(-1).view(n, pixels, taps, groups) * ok)
        if modulation is not None:
            weight = weight * modulation
        contribution = grad_cols * weight.reshape(n, pixels * taps, groups, 1)
        grad_source.scatter_add_(1, gather_index, contribution.to(grad_source.dtype))
    s00, s01, s10, s11 = corner_sums
    fy, fx = corners.frac_y, corners.frac_x
    grad_y = (s10 - s00) * (1 - fx) + (s11 - s01) * fx
    grad_x = (s01 - s00) * (1 - fy) + (s11 - s10) * fy
    if modulation is not None:
        grad_y, grad_x = grad_y * modulation, grad_x * modulation
    pairs = torch.stack((grad_y, grad_x), dim=-1)  # (n, L, K, G, 2)
    grad_offset.copy_(pairs.permute(0, 3, 2, 4, 1).reshape(grad_offset.shape))
    if grad_mask is not None:
        sampled = sum(s * w for s, w in zip(corner_sums, corners.weights))  # (n, L, K, G)
        grad_mask.copy_(sampled.permute(0, 3, 2, 1).reshape(grad_mask.shape))


@dataclass(frozen=True)
class Sampler:
    """A sampler: ``sample`` (step 1), ``backward`` (step 3), bytes per column element."""

    name: str
    sample: Callable[..., Tensor]
    backward: Callable[..., None]
    column_dtype_bytes: Callable[[Tensor, Tensor], int]  # bytes per column element (x, offset)


TORCH_SAMPLER = Sampler(
    "torch", torch_sample_columns, torch_sample_columns_backward, lambda x, offset: 3 * offset.element_size()
)


@functools.cache
def triton_sampler() -> Sampler | None:
    """The Triton sampler, or None where Triton is not importable."""
    try:
        from detector.fast.triton import deform as fast_deform_triton
    except ImportError:
        return None
    return Sampler(
        "triton", fast_deform_triton.sample_columns, fast_deform_triton.sample_columns_backward,
        lambda x, offset: 2 * x.element_size(),
    )


def resolve_sampler(backend: str, x: Tensor) -> Sampler:
    """"torch" | "triton" | "auto" (triton on CUDA when importable) -> Sampler; ValueError otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"deform_conv2d_columns: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return TORCH_SAMPLER
    sampler = triton_sampler()
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: the CPU tests use it.
    runnable = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if sampler is None or not runnable:
        if backend == "triton":
            raise ValueError("deform_conv2d_columns: backend 'triton' needs a CUDA input and an importable triton")
        return TORCH_SAMPLER
    return sampler
