"""A faster modulated deformable convolution: bilinear-gather im2col + one GEMM.

``deform_conv2d_fast`` is a drop-in for ``torchvision.ops.deform_conv2d`` (same signature, same
values, same gradients): offset groups are inferred from the offset channels, weight groups from
``in_channels // weight.shape[1]``, the offset layout is torchvision's -- for offset group g and
kernel tap k = i*kw + j, channel ``2*(g*K + k)`` holds dy and ``2*(g*K + k) + 1`` dx -- and the
mask channel ``g*K + k`` multiplies that sample. Sampling is bilinear with zero padding (corners
outside the image read 0); the offset gradient is the derivative of that formula with the lower
corner at ``floor(y)``, i.e. one-sided from above at integer positions -- exactly torchvision's
kernels, which matters at zero offsets (a fresh DCN), where every sample sits on an integer.

How it works, per chunk of images (DESIGN section 10 has the motivation):

1. *sample*: for every output pixel, tap and input channel, bilinearly interpolate the input at
   the offset position and multiply by the mask, giving columns ``(n*L, Gw, K, Cw)`` (L output
   pixels, Gw weight groups of Cw channels, K taps) in the compute dtype; coordinates and
   interpolation weights are always float32 (float64 for float64 inputs);
2. *GEMM*: per weight group one ``columns @ (Cout/Gw, K*Cw)^T`` over the pixels of all images of
   the chunk, bias fused, writes the NHWC (channels_last) output directly -- tensor cores in
   bf16/fp16;
3. backward takes the weight gradient from one GEMM per weight group over the forward's columns
   (kept, or sampled again: ``DeformOptions.keep_columns``), the column gradient from another, and
   scatters it back to the input (atomics), the offsets and the masks.

The output has the input's memory format, like ``conv2d``: channels_last for a channels_last input
(no layout copies in a channels_last model, in either direction), NCHW-contiguous otherwise.
Extra memory per call is bounded by ``COLUMN_BUDGET_BYTES`` (the batch is processed in chunks of
images).

Two samplers implement steps 1 and 3 (:mod:`detector.fast.deform_sampler`): ``torch`` (gather /
scatter_add, any device, the tested reference) and ``triton`` (fused CUDA kernels in
:mod:`detector.fast.triton.deform`). This module is the op: its options, the GEMMs, the autograd
function and the public entry points.
Unlike torchvision this runs in bfloat16. Under autocast it behaves like ``conv2d``: input,
weight and bias are cast to the autocast dtype and the output has that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import Tensor

from detector.fast.deform_sampler import DeformGeometry, describe_deform_conv, resolve_sampler, triton_sampler
from detector.model.deform import DEFORM_IMPLS, autocast_enabled

# Column bytes per chunk of images: bounds the extra memory of one call (the torch sampler keeps
# about three float32 column-sized temporaries, the triton one two in the compute dtype).
COLUMN_BUDGET_BYTES = 4 << 30  # one chunk for a batch of 16 at P3 of 800 x 1333 (fewer launches)

DeformConv2d = Callable[..., Tensor]


# --- GEMMs and the autograd function ------------------------------------------------------------


@dataclass(frozen=True)
class DeformOptions:
    """Speed/memory trade-offs of the fast path; every combination gives the same values up to rounding.

    - ``keep_columns``: the forward keeps its columns for the weight gradient (one column-sized
      tensor per call held until backward) instead of the backward sampling them again;
    - ``packed``: :class:`detector.model.deform.ModulatedDeformConv` hands the predictor's raw output to
      :func:`deform_conv2d_packed` (sigmoid and split inside the kernels) instead of slicing it;
    - ``low_precision_input_grad``: in bf16/fp16 the input gradient is accumulated (atomics) in
      that dtype, like torchvision's and mmcv's half-precision kernels, instead of in float32 --
      half the atomic traffic, no float32 buffer to convert.

    All on by default: on an H100 (bf16, DESIGN shape) keep_columns and low_precision_input_grad
    take a DCN layer from 9.9 to 7.7 ms with the same gradient error against float64, and packed
    adds ~6% to nasfcos training (experiments/dcn_notes.md, PERF.md); keeping columns costs one
    column-sized tensor per DCN call until backward (nasfcos at batch 16: 14.6 -> 24 GB peak).
    """

    keep_columns: bool = True
    low_precision_input_grad: bool = True
    packed: bool = True


# Read at every call: experiments/bench_dcn.py swaps it to time the variants.
DEFAULT_OPTIONS = DeformOptions()


def _weight_columns(weight: Tensor, geo: DeformGeometry) -> Tensor:
    """(Cout, Cw, kh, kw) -> (Gw, Cout/Gw, K*Cw), matching the (Gw, K, Cw) column layout."""
    out_channels, group_channels = weight.shape[:2]
    per_group = weight.reshape(geo.weight_groups, out_channels // geo.weight_groups, group_channels, geo.taps)
    return per_group.transpose(2, 3).reshape(geo.weight_groups, out_channels // geo.weight_groups, -1)


def _group_columns(columns: Tensor) -> Tensor:
    """(rows, Gw, K, Cw) -> (rows, Gw, K*Cw), a view."""
    return columns.view(columns.shape[0], columns.shape[1], -1)


def _columns_times_weight(columns: Tensor, weight_cols: Tensor, bias: Tensor | None, out_rows: Tensor) -> None:
    """out_rows (rows, Cout) = columns (rows, Gw, K, Cw) x weight_cols (Gw, Cout/Gw, K*Cw)^T (+ bias).

    One GEMM per weight group over all pixels of all images: the result is NHWC, the
    channels_last layout of the output (bias fused into the GEMM).
    """
    grouped = _group_columns(columns)
    groups, per_group = weight_cols.shape[:2]
    if groups == 1:  # straight into the output rows (a contiguous slice of the output)
        if bias is None:
            torch.mm(grouped[:, 0], weight_cols[0].t(), out=out_rows)
        else:
            torch.addmm(bias, grouped[:, 0], weight_cols[0].t(), out=out_rows)
        return
    for g in range(groups):
        part = slice(g * per_group, (g + 1) * per_group)
        product = grouped[:, g] @ weight_cols[g].t()
        out_rows[:, part] = product if bias is None else product + bias[part]


def _grad_columns(grad_rows: Tensor, weight_cols: Tensor, taps: int) -> Tensor:
    """grad_rows (rows, Cout) x weight_cols (Gw, Cout/Gw, K*Cw) -> column gradient (rows, Gw, K, Cw)."""
    groups, per_group, width = weight_cols.shape
    grad = grad_rows.new_empty(grad_rows.shape[0], groups, width)
    if groups == 1:
        torch.mm(grad_rows, weight_cols[0], out=grad.view(grad_rows.shape[0], width))
    else:
        for g in range(groups):
            grad[:, g] = grad_rows[:, g * per_group:(g + 1) * per_group] @ weight_cols[g]
    return grad.view(grad_rows.shape[0], groups, taps, -1)


def _accumulate_grad_weight(grad_rows: Tensor, columns: Tensor, grad_weight_cols: Tensor | None,
                            acc_dtype: torch.dtype) -> Tensor:
    """grad_weight_cols (Gw, Cout/Gw, K*Cw) + grad_rows (rows, Cout)^T x columns (rows, Gw, K*Cw), per group.

    ``None`` starts the sum: the first chunk's product is returned as it is (compute dtype, no
    zero-filled buffer, no cast: the common one-chunk case); later chunks accumulate in acc_dtype.
    """
    grouped = _group_columns(columns)
    groups = grouped.shape[1]
    per_group = grad_rows.shape[1] // groups
    parts = [grad_rows[:, g * per_group:(g + 1) * per_group].t() @ grouped[:, g] for g in range(groups)]
    product = parts[0].unsqueeze(0) if groups == 1 else torch.stack(parts)
    return product if grad_weight_cols is None else grad_weight_cols.to(acc_dtype) + product


class _DeformConvColumns(torch.autograd.Function):
    """Rows are output pixels in NHWC order (image, y, x): GEMM outputs and gradients are channels_last."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, geo, sampler, images_per_chunk, options, packed):
        # packed: offset is the predictor's (N, 3GK, Ho, Wo) output, mask logits included (mask is None)
        layout = {"packed": True} if packed else {}
        # x (N, C, H, W) compute dtype; offset (N, 2GK, Ho, Wo) / mask (N, GK, Ho, Wo): the coord dtype
        # for the torch sampler, any float dtype for the Triton one
        batch = x.shape[0]
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C); free if x is channels_last
        weight_cols = _weight_columns(weight, geo)
        pixels = geo.out_pixels
        out_rows = x.new_empty(batch * pixels, weight.shape[0])  # (N*L, Cout): NHWC
        keep = options.keep_columns and ctx.needs_input_grad[3]
        ctx.kept_columns = [] if keep else None  # per chunk, for the weight gradient
        for start in range(0, batch, images_per_chunk):
            stop = min(start + images_per_chunk, batch)
            columns = sampler.sample(x_nhwc[start:stop], offset[start:stop],
                                     None if mask is None else mask[start:stop], geo, **layout)
            _columns_times_weight(columns, weight_cols, bias, out_rows[start * pixels:stop * pixels])
            if keep:
                ctx.kept_columns.append(columns)
            del columns
        # x_nhwc, not x: backward needs this layout, and keeping it saves a copy there
        ctx.save_for_backward(x_nhwc, offset, mask, weight, bias)
        ctx.geo, ctx.sampler, ctx.images_per_chunk, ctx.options, ctx.layout = geo, sampler, images_per_chunk, options, layout
        return out_rows.view(batch, geo.out_height, geo.out_width, -1).permute(0, 3, 1, 2)  # channels_last

    @staticmethod
    def backward(ctx, grad_out):
        x_nhwc, offset, mask, weight, bias = ctx.saved_tensors
        geo, sampler, chunk, options = ctx.geo, ctx.sampler, ctx.images_per_chunk, ctx.options
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        with torch.autocast(x_nhwc.device.type, enabled=False):
            batch, pixels = x_nhwc.shape[0], geo.out_pixels
            # (N*L, Cout); free when grad_out is channels_last, one copy otherwise
            grad_rows = grad_out.to(x_nhwc.dtype).permute(0, 2, 3, 1).reshape(batch * pixels, -1)
            weight_cols = _weight_columns(weight, geo)  # (Gw, Cout/Gw, K*Cw)
            acc_dtype = torch.float64 if x_nhwc.dtype == torch.float64 else torch.float32
            grad_weight_cols = None  # summed over chunks by _accumulate_grad_weight
            need_columns_grad = need_x or need_offset or need_mask
            low_precision = options.low_precision_input_grad and x_nhwc.dtype in (torch.bfloat16, torch.float16)
            grad_x_dtype = x_nhwc.dtype if low_precision else acc_dtype  # the atomics' accumulator
            grad_x_nhwc = (torch.zeros(x_nhwc.shape, device=x_nhwc.device, dtype=grad_x_dtype)
                           if need_columns_grad else None)
            grad_offset = torch.empty_like(offset) if need_columns_grad else None
            grad_mask = torch.empty_like(mask) if need_columns_grad and mask is not None else None
            for index, start in enumerate(range(0, batch, chunk)):
                stop = min(start + chunk, batch)
                rows = grad_rows[start * pixels:stop * pixels]
                mask_chunk = None if mask is None else mask[start:stop]
                if need_weight:
                    if ctx.kept_columns is not None:
                        columns = ctx.kept_columns[index]
                    else:
                        columns = sampler.sample(x_nhwc[start:stop], offset[start:stop], mask_chunk, geo,
                                                 **ctx.layout)
                    grad_weight_cols = _accumulate_grad_weight(rows, columns, grad_weight_cols, acc_dtype)
                    del columns
                if need_columns_grad:
                    grad_columns = _grad_columns(rows, weight_cols, geo.taps)  # (n*L, Gw, K, Cw)
                    sampler.backward(
                        grad_columns, x_nhwc[start:stop], offset[start:stop], mask_chunk, geo,
                        grad_x_nhwc[start:stop], grad_offset[start:stop],
                        None if grad_mask is None else grad_mask[start:stop], **ctx.layout,
                    )
                    del grad_columns
            # NHWC accumulator -> the input dtype, channels_last (one pass, no layout change)
            grad_x = grad_x_nhwc.to(x_nhwc.dtype).permute(0, 3, 1, 2) if need_x else None
            grad_weight = None
            if need_weight:
                groups, out_per_group = weight_cols.shape[:2]
                grad_weight = (
                    grad_weight_cols.view(groups, out_per_group, geo.taps, weight.shape[1])
                    .transpose(2, 3).reshape(weight.shape).to(weight.dtype)
                )
            grad_bias = grad_rows.sum(0, dtype=acc_dtype).to(bias.dtype) if need_bias else None
        return (grad_x, grad_offset if need_offset else None, grad_mask if need_mask else None,
                grad_weight, grad_bias, None, None, None, None, None)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if autocast_enabled(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def deform_conv2d_columns(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride=1, padding=0, dilation=1, mask: Tensor | None = None,
    *, backend: str = "auto", column_budget_bytes: int = COLUMN_BUDGET_BYTES, options: DeformOptions | None = None,
) -> Tensor:
    """:func:`deform_conv2d_fast` with the sampler (``backend``) and the chunk budget exposed."""
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, backend,
                          column_budget_bytes, options, packed=False)


def deform_conv2d_packed(
    input: Tensor, offset_mask: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride=1, padding=0, dilation=1,
    *, backend: str = "auto", column_budget_bytes: int = COLUMN_BUDGET_BYTES, options: DeformOptions | None = None,
) -> Tensor:
    """DCNv2 from the offset predictor's raw output ``offset_mask`` (N, 3*G*K, Ho, Wo): the same as
    ``deform_conv2d_fast(input, offset_mask[:, :2GK], ..., mask=offset_mask[:, 2GK:].sigmoid())``.

    With the Triton sampler the kernels read the offsets and the mask logits in place, apply the
    sigmoid and write one gradient for the whole tensor (no slices, sigmoid or gradient
    concatenation around the call); the torch sampler takes the spelled-out form above.
    """
    taps = weight.shape[2] * weight.shape[3]
    if offset_mask.dim() != 4 or offset_mask.shape[1] % (3 * taps):
        raise ValueError(f"deform_conv2d_packed: offset_mask {tuple(offset_mask.shape)} must have 3*G*{taps} channels")
    split = 2 * taps * (offset_mask.shape[1] // (3 * taps))
    if resolve_sampler(backend, input).name != "triton":
        return deform_conv2d_columns(input, offset_mask[:, :split], weight, bias, stride, padding, dilation,
                                     offset_mask[:, split:].sigmoid(), backend=backend,
                                     column_budget_bytes=column_budget_bytes, options=options)
    return _deform_conv2d(input, offset_mask, weight, bias, stride, padding, dilation, None, backend,
                          column_budget_bytes, options, packed=True)


def _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, backend, column_budget_bytes,
                   options, packed: bool) -> Tensor:
    if packed:  # geometry checks on the two parts' shapes
        split = offset.shape[1] * 2 // 3
        geo = describe_deform_conv(input, offset[:, :split], weight, bias, offset[:, split:], stride, padding, dilation)
    else:
        geo = describe_deform_conv(input, offset, weight, bias, mask, stride, padding, dilation)
    if not input.is_floating_point():
        raise ValueError(f"deform_conv2d_fast: input must be floating point, got {input.dtype}")
    compute_dtype = _compute_dtype(input)
    coord_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    with torch.autocast(input.device.type, enabled=False):
        x = input.to(compute_dtype)
        sampler = resolve_sampler(backend, x)
        if x.shape[0] == 0:
            return x.new_zeros(0, weight.shape[0], geo.out_height, geo.out_width)
        bytes_per_image = geo.out_pixels * geo.taps * x.shape[1] * sampler.column_dtype_bytes(
            x, offset.new_empty(0, dtype=coord_dtype))
        images_per_chunk = max(1, min(x.shape[0], column_budget_bytes // bytes_per_image))
        if sampler.name != "triton":  # the Triton kernels read offsets / masks in any dtype (no copies)
            offset, mask = offset.to(coord_dtype), None if mask is None else mask.to(coord_dtype)
        out = _DeformConvColumns.apply(
            x, offset.contiguous(), None if mask is None else mask.contiguous(),
            weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype),
            geo, sampler, images_per_chunk, DEFAULT_OPTIONS if options is None else options, packed,
        )  # channels_last
        # the input's layout, like conv2d: channels_last stays so, anything else gets NCHW-contiguous
        return out if input.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def deform_conv2d_fast(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride=1, padding=0, dilation=1, mask: Tensor | None = None,
) -> Tensor:
    """Drop-in for ``torchvision.ops.deform_conv2d``: (N, Cin, H, W) -> (N, Cout, Ho, Wo).

    Same arguments, values and gradients as torchvision (see the module docstring for the
    layout); also runs in bfloat16, and under autocast computes in the autocast dtype. Uses the
    Triton sampler on CUDA when Triton is importable, the torch sampler otherwise. Raises
    ValueError on inconsistent shapes.
    """
    return deform_conv2d_columns(input, offset, weight, bias, stride, padding, dilation, mask)


def deform_conv2d_auto(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride=1, padding=0, dilation=1, mask: Tensor | None = None,
) -> Tensor:
    """The faster of the two per call (experiments/dcn_notes.md has the H100 measurements).

    Fast where its Triton sampler runs (CUDA with Triton importable: 2x faster than torchvision in
    float32, 6x in bf16/fp16) and for bfloat16 (torchvision has no bf16 kernel); torchvision
    otherwise (CPU, or CUDA without Triton, where the torch sampler is about 2x slower).
    """
    impl = deform_conv2d_fast if auto_uses_fast(input) else torchvision.ops.deform_conv2d
    return impl(input, offset, weight, bias, stride, padding, dilation, mask)


def auto_uses_fast(input: Tensor) -> bool:
    """Whether ``auto`` takes the fast kernel for this input (bfloat16, or CUDA with Triton)."""
    return _compute_dtype(input) == torch.bfloat16 or (input.is_cuda and triton_sampler() is not None)


def packed_impl(impl: DeformConv2d, input: Tensor) -> Callable[..., Tensor] | None:
    """:func:`deform_conv2d_packed` where ``impl`` (from :func:`select_deform_conv2d`) would take the
    fast path for this input, else None (then call ``impl`` with the split offsets and mask)."""
    fast = impl is deform_conv2d_fast or (impl is deform_conv2d_auto and auto_uses_fast(input))
    if fast and DEFAULT_OPTIONS.packed:
        return deform_conv2d_packed
    return None


def select_deform_conv2d(impl: str) -> DeformConv2d:
    """"torchvision" | "fast" | "auto" -> a function with torchvision's deform_conv2d signature."""
    table = {"torchvision": torchvision.ops.deform_conv2d, "fast": deform_conv2d_fast, "auto": deform_conv2d_auto}
    if impl not in table:
        raise ValueError(f"select_deform_conv2d: impl must be one of {DEFORM_IMPLS}, got {impl!r}")
    return table[impl]
