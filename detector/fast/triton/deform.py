"""Fused Triton kernels for the two sampling steps of :mod:`detector.fast.deform`.

Same contract as the torch sampler there (its tested reference), one kernel each:

- ``sample_columns``: reads the offsets / masks of a block of output pixels for one
  (offset group, tap), computes the four bilinear corners once in float32 (float64 for float64
  inputs), gathers those corners from the NHWC input for all channels of the group and writes the
  modulated columns in the compute dtype -- one pass, nothing but the columns is written;
- ``sample_columns_backward``: the same walk over the column gradient; scatters it to the
  input gradient with atomics (contiguous channels, in grad_x's dtype: float32, float64 or the
  compute dtype) and reduces the per-corner channel sums in registers into the offset and mask
  gradients (no atomics there).

Layouts: input ``(n, H, W, C)``; columns ``(n*L, Gw, K, Cw)``; offsets ``(n, 2*G*K, Ho, Wo)`` and
masks ``(n, G*K, Ho, Wo)`` contiguous, in any float dtype (their gradients are written in it).
One program handles ``BLOCK_ROWS`` output pixels of one (group, tap) and loops over the group's channels; the
program ids enumerate (row block, group, tap) with the tap fastest.
Runs on CUDA; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (rows per program, channels per step, warps) per kernel; experiments/bench_dcn.py sweeps these.
# Defaults: the fastest of experiments/bench_dcn.py --sweep on an H100 (bf16, DESIGN shape).
KERNEL_CONFIGS = {"forward": (16, 64, 2), "backward": (64, 64, 8)}


@triton.jit
def _sampling_point(
    offset_ptr, mask_ptr, rows, row_ok, gk, pixels, out_width, height, width,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    GROUPS: tl.constexpr, TAPS: tl.constexpr, KERNEL_W: tl.constexpr, HAS_MASK: tl.constexpr, COORD: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Bilinear corner data of the sampling points of ``rows`` (flat n*L + l) for tap/group ``gk``.

    Offsets and masks are read in their own dtype (bf16 straight from the predictor conv) and
    converted to the coordinate dtype ``COORD`` (float32; float64 for float64 inputs): exact."""
    tap = gk % TAPS
    image = rows // pixels
    pixel = rows - image * pixels
    out_y = pixel // out_width
    out_x = pixel - out_y * out_width
    # PACKED: offsets and mask *logits* in one (n, 3*G*K, Ho, Wo) tensor (the predictor conv's output)
    offset_channels = 3 * GROUPS * TAPS if PACKED else 2 * GROUPS * TAPS
    offset_index = (image * offset_channels + 2 * gk).to(tl.int64) * pixels + pixel
    dy = tl.load(offset_ptr + offset_index, mask=row_ok, other=0.0).to(COORD)
    dx = tl.load(offset_ptr + offset_index + pixels, mask=row_ok, other=0.0).to(COORD)
    y = dy + (out_y * stride_h - pad_h + (tap // KERNEL_W) * dil_h)
    x = dx + (out_x * stride_w - pad_w + (tap % KERNEL_W) * dil_w)
    y = tl.minimum(tl.maximum(y, -2.0), height + 1.0)  # finite integer casts; only all-invalid samples move
    x = tl.minimum(tl.maximum(x, -2.0), width + 1.0)
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    frac_y = y - y0f
    frac_x = x - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    if PACKED:
        mask_index = (image * (3 * GROUPS * TAPS) + 2 * GROUPS * TAPS + gk).to(tl.int64) * pixels + pixel
    else:
        mask_index = (image * (GROUPS * TAPS) + gk).to(tl.int64) * pixels + pixel
    if HAS_MASK:
        modulation = tl.load(mask_ptr + mask_index, mask=row_ok, other=0.0).to(COORD)
        if PACKED:
            modulation = 1.0 / (1.0 + tl.exp(-modulation))
    else:
        modulation = frac_y * 0.0 + 1.0
    row0 = (y0 >= 0) & (y0 < height) & row_ok
    row1 = (y0 + 1 >= 0) & (y0 + 1 < height) & row_ok
    col0 = (x0 >= 0) & (x0 < width)
    col1 = (x0 + 1 >= 0) & (x0 + 1 < width)
    pixel00 = (image.to(tl.int64) * height + y0) * width + x0
    return (offset_index, mask_index, modulation, frac_y, frac_x,
            row0 & col0, row0 & col1, row1 & col0, row1 & col1, pixel00)


@triton.jit
def _corner_weights_and_addresses(modulation, fy, fx, ok00, ok01, ok10, ok11, pixel00, width, channels):
    """Modulated bilinear weights (0 for corners outside the image) and NHWC element offsets of the
    four corners, each as a (BLOCK_ROWS, 1) column."""
    w00 = tl.where(ok00, (1.0 - fy) * (1.0 - fx) * modulation, 0.0)[:, None]
    w01 = tl.where(ok01, (1.0 - fy) * fx * modulation, 0.0)[:, None]
    w10 = tl.where(ok10, fy * (1.0 - fx) * modulation, 0.0)[:, None]
    w11 = tl.where(ok11, fy * fx * modulation, 0.0)[:, None]
    a00 = (pixel00 * channels)[:, None]
    a01 = a00 + channels
    a10 = a00 + width * channels
    a11 = a10 + channels
    return w00, w01, w10, w11, a00, a01, a10, a11


@triton.jit
def _column_index(channel, tap, channels, TAPS: tl.constexpr, WEIGHT_GROUP_CHANNELS: tl.constexpr,
                  ONE_WEIGHT_GROUP: tl.constexpr):
    """Column of (tap, channel) in the (Gw, K, Cw) layout, as a (1, BLOCK_CHANNELS) row."""
    if ONE_WEIGHT_GROUP:
        column = tap * channels + channel  # plain form keeps the channel contiguity visible (vector stores)
    else:
        column = ((channel // WEIGHT_GROUP_CHANNELS) * (TAPS * WEIGHT_GROUP_CHANNELS)
                  + tap * WEIGHT_GROUP_CHANNELS + channel % WEIGHT_GROUP_CHANNELS)
    return column[None, :]


@triton.jit
def _scatter_column_gradient(grad, x_ptr, grad_x_ptr, channel, a00, a01, a10, a11, ok00, ok01, ok10, ok11, c_ok,
                             w00, w01, w10, w11, s00, s01, s10, s11):
    """One (rows, channels) block of the column gradient: add it to the input gradient at the four
    corners (atomics, in grad_x's dtype) and return the per-corner sums of grad * input."""
    source = x_ptr + channel[None, :]
    target = grad_x_ptr + channel[None, :]
    m00 = ok00[:, None] & c_ok
    m01 = ok01[:, None] & c_ok
    m10 = ok10[:, None] & c_ok
    m11 = ok11[:, None] & c_ok
    s00 += tl.sum(grad * tl.load(source + a00, mask=m00, other=0.0).to(grad.dtype), axis=1)
    s01 += tl.sum(grad * tl.load(source + a01, mask=m01, other=0.0).to(grad.dtype), axis=1)
    s10 += tl.sum(grad * tl.load(source + a10, mask=m10, other=0.0).to(grad.dtype), axis=1)
    s11 += tl.sum(grad * tl.load(source + a11, mask=m11, other=0.0).to(grad.dtype), axis=1)
    accumulator = grad_x_ptr.dtype.element_ty
    tl.atomic_add(target + a00, (grad * w00).to(accumulator), mask=m00, sem="relaxed")
    tl.atomic_add(target + a01, (grad * w01).to(accumulator), mask=m01, sem="relaxed")
    tl.atomic_add(target + a10, (grad * w10).to(accumulator), mask=m10, sem="relaxed")
    tl.atomic_add(target + a11, (grad * w11).to(accumulator), mask=m11, sem="relaxed")
    return s00, s01, s10, s11


@triton.jit
def _store_offset_mask_gradients(grad_offset_ptr, grad_mask_ptr, offset_index, mask_index, pixels, row_ok,
                                 modulation, fy, fx, s00, s01, s10, s11, HAS_MASK: tl.constexpr,
                                 PACKED: tl.constexpr):
    """Offset (dy, dx) and mask gradients of the rows from the per-corner channel sums."""
    grad_y = ((s10 - s00) * (1.0 - fx) + (s11 - s01) * fx) * modulation
    grad_x = ((s01 - s00) * (1.0 - fy) + (s11 - s10) * fy) * modulation
    offset_dtype = grad_offset_ptr.dtype.element_ty
    tl.store(grad_offset_ptr + offset_index, grad_y.to(offset_dtype), mask=row_ok)
    tl.store(grad_offset_ptr + offset_index + pixels, grad_x.to(offset_dtype), mask=row_ok)
    if HAS_MASK:
        sampled = (s00 * (1.0 - fy) * (1.0 - fx) + s01 * (1.0 - fy) * fx
                   + s10 * fy * (1.0 - fx) + s11 * fy * fx)
        if PACKED:  # the mask's logit: d sigmoid = s * (1 - s)
            sampled = sampled * modulation * (1.0 - modulation)
        tl.store(grad_mask_ptr + mask_index, sampled.to(grad_mask_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sample_columns_kernel(
    x_ptr, offset_ptr, mask_ptr, columns_ptr,
    num_rows, pixels, out_width, height, width, channels,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    GROUPS: tl.constexpr, TAPS: tl.constexpr, KERNEL_W: tl.constexpr,
    GROUP_CHANNELS: tl.constexpr, WEIGHT_GROUP_CHANNELS: tl.constexpr, ONE_WEIGHT_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, COORD: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    # gk varies fastest over the program ids: the G*K programs of one row block run together and
    # share its input pixels (and, backward, its gradient atomics) in L2 instead of re-reading
    # the whole input once per tap.
    gk = tl.program_id(0) % (GROUPS * TAPS)
    rows = (tl.program_id(0) // (GROUPS * TAPS)) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    (_, _, modulation, fy, fx, ok00, ok01, ok10, ok11, pixel00) = _sampling_point(
        offset_ptr, mask_ptr, rows, row_ok, gk, pixels, out_width, height, width,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, GROUPS, TAPS, KERNEL_W, HAS_MASK, COORD, PACKED)
    group = gk // TAPS
    tap = gk % TAPS
    w00, w01, w10, w11, a00, a01, a10, a11 = _corner_weights_and_addresses(
        modulation, fy, fx, ok00, ok01, ok10, ok11, pixel00, width, channels)
    column_row = (rows.to(tl.int64) * (TAPS * channels))[:, None]
    for c0 in range(0, GROUP_CHANNELS, BLOCK_CHANNELS):
        c = c0 + tl.arange(0, BLOCK_CHANNELS)
        c_ok = (c < GROUP_CHANNELS)[None, :]
        channel = group * GROUP_CHANNELS + c
        column = _column_index(channel, tap, channels, TAPS, WEIGHT_GROUP_CHANNELS, ONE_WEIGHT_GROUP)
        source = x_ptr + channel[None, :]
        acc = w00 * tl.load(source + a00, mask=ok00[:, None] & c_ok, other=0.0).to(fy.dtype)
        acc += w01 * tl.load(source + a01, mask=ok01[:, None] & c_ok, other=0.0).to(fy.dtype)
        acc += w10 * tl.load(source + a10, mask=ok10[:, None] & c_ok, other=0.0).to(fy.dtype)
        acc += w11 * tl.load(source + a11, mask=ok11[:, None] & c_ok, other=0.0).to(fy.dtype)
        tl.store(columns_ptr + column_row + column, acc.to(columns_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok)


@triton.jit
def _sample_columns_backward_kernel(
    grad_columns_ptr, x_ptr, offset_ptr, mask_ptr, grad_x_ptr, grad_offset_ptr, grad_mask_ptr,
    num_rows, pixels, out_width, height, width, channels,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    GROUPS: tl.constexpr, TAPS: tl.constexpr, KERNEL_W: tl.constexpr,
    GROUP_CHANNELS: tl.constexpr, WEIGHT_GROUP_CHANNELS: tl.constexpr, ONE_WEIGHT_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, COORD: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    # gk varies fastest over the program ids: the G*K programs of one row block run together and
    # share its input pixels (and, backward, its gradient atomics) in L2 instead of re-reading
    # the whole input once per tap.
    gk = tl.program_id(0) % (GROUPS * TAPS)
    rows = (tl.program_id(0) // (GROUPS * TAPS)) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    (offset_index, mask_index, modulation, fy, fx, ok00, ok01, ok10, ok11, pixel00) = _sampling_point(
        offset_ptr, mask_ptr, rows, row_ok, gk, pixels, out_width, height, width,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, GROUPS, TAPS, KERNEL_W, HAS_MASK, COORD, PACKED)
    group = gk // TAPS
    tap = gk % TAPS
    w00, w01, w10, w11, a00, a01, a10, a11 = _corner_weights_and_addresses(
        modulation, fy, fx, ok00, ok01, ok10, ok11, pixel00, width, channels)
    column_row = (rows.to(tl.int64) * (TAPS * channels))[:, None]
    s00 = tl.zeros((BLOCK_ROWS,), dtype=fy.dtype)  # per corner: sum over channels of grad * input
    s01 = tl.zeros((BLOCK_ROWS,), dtype=fy.dtype)
    s10 = tl.zeros((BLOCK_ROWS,), dtype=fy.dtype)
    s11 = tl.zeros((BLOCK_ROWS,), dtype=fy.dtype)
    for c0 in range(0, GROUP_CHANNELS, BLOCK_CHANNELS):
        c = c0 + tl.arange(0, BLOCK_CHANNELS)
        c_ok = (c < GROUP_CHANNELS)[None, :]
        channel = group * GROUP_CHANNELS + c
        column = _column_index(channel, tap, channels, TAPS, WEIGHT_GROUP_CHANNELS, ONE_WEIGHT_GROUP)
        grad = tl.load(grad_columns_ptr + column_row + column, mask=row_ok[:, None] & c_ok, other=0.0).to(fy.dtype)
        s00, s01, s10, s11 = _scatter_column_gradient(
            grad, x_ptr, grad_x_ptr, channel, a00, a01, a10, a11, ok00, ok01, ok10, ok11, c_ok,
            w00, w01, w10, w11, s00, s01, s10, s11)
    _store_offset_mask_gradients(grad_offset_ptr, grad_mask_ptr, offset_index, mask_index, pixels, row_ok,
                                 modulation, fy, fx, s00, s01, s10, s11, HAS_MASK, PACKED)


def _launch_args(x_nhwc: Tensor, geo, kernel: str) -> tuple[tuple, dict, tuple]:
    n, height, width, channels = x_nhwc.shape
    block_rows, block_channels, num_warps = KERNEL_CONFIGS[kernel]
    group_channels = channels // geo.offset_groups
    block_channels = min(block_channels, triton.next_power_of_2(group_channels))
    num_rows = n * geo.out_pixels
    scalars = (num_rows, geo.out_pixels, geo.out_width, height, width, channels,
               *geo.stride, *geo.padding, *geo.dilation)
    meta = dict(
        GROUPS=geo.offset_groups, TAPS=geo.taps, KERNEL_W=geo.kernel_w, GROUP_CHANNELS=group_channels,
        WEIGHT_GROUP_CHANNELS=channels // geo.weight_groups, ONE_WEIGHT_GROUP=geo.weight_groups == 1,
        COORD=tl.float64 if x_nhwc.dtype == torch.float64 else tl.float32,
        BLOCK_ROWS=block_rows, BLOCK_CHANNELS=block_channels, num_warps=num_warps,
    )
    grid = (triton.cdiv(num_rows, block_rows) * geo.offset_groups * geo.taps,)
    return scalars, meta, grid


def sample_columns(x_nhwc: Tensor, offset: Tensor, mask: Tensor | None, geo, packed: bool = False) -> Tensor:
    """Modulated bilinear columns (n*L, Gw, K, Cw) in x's dtype from x (n, H, W, C).

    ``packed``: ``offset`` is the predictor's whole output (n, 3*G*K, Ho, Wo) -- offsets, then mask
    logits, sigmoid applied here -- and ``mask`` is ignored."""
    n, _, _, channels = x_nhwc.shape
    columns = x_nhwc.new_empty(n * geo.out_pixels, geo.weight_groups, geo.taps, channels // geo.weight_groups)
    scalars, meta, grid = _launch_args(x_nhwc, geo, "forward")
    mask = offset if packed else mask
    _sample_columns_kernel[grid](
        x_nhwc, offset, offset if mask is None else mask, columns, *scalars, HAS_MASK=mask is not None,
        PACKED=packed, **meta,
    )
    return columns


def sample_columns_backward(
    grad_columns: Tensor, x_nhwc: Tensor, offset: Tensor, mask: Tensor | None, geo,
    grad_x_nhwc: Tensor, grad_offset: Tensor, grad_mask: Tensor | None, packed: bool = False,
) -> None:
    """Accumulate into grad_x_nhwc (n, H, W, C) and write grad_offset / grad_mask (offset's dtype).

    ``packed``: as in :func:`sample_columns`; grad_offset (n, 3*G*K, Ho, Wo) receives the offset and
    mask-logit gradients, every channel written."""
    if packed:
        mask, grad_mask = offset, grad_offset
    if mask is not None and grad_mask is None:
        grad_mask = offset.new_empty(mask.shape)
    scalars, meta, grid = _launch_args(x_nhwc, geo, "backward")
    _sample_columns_backward_kernel[grid](
        grad_columns, x_nhwc, offset, offset if mask is None else mask, grad_x_nhwc, grad_offset,
        grad_offset if grad_mask is None else grad_mask, *scalars, HAS_MASK=mask is not None, PACKED=packed, **meta,
    )
