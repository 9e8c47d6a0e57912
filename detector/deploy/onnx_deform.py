"""The deformable convolution in exportable forms: standard ONNX operators, or the opset-19 node.

ONNX has a ``DeformConv`` operator since opset 19, but ONNX Runtime does not implement it, so an
exported detector offers two forms (``dcn=`` of ``python -m detector export``):

- ``decomposed`` (:func:`deform_conv2d_decomposed`, the default): the same function as
  ``torchvision.ops.deform_conv2d`` (stride 1, dilation 1, one weight group) written with
  operators every runtime has. The offsets give, for every output position and kernel tap, a
  sampling point; one ``GridSample`` (bilinear, zeros padding) per DCN reads all taps of all
  offset groups at once; the samples are multiplied by the modulation mask and rearranged into
  columns ``(N, C_in * K * K, H, W)``; a 1x1 ``Conv`` with the DCN weight reshaped to
  ``(C_out, C_in * K * K, 1, 1)`` and the bias finishes. torchvision's bilinear sampling reads 0
  outside the image per corner, which is ``GridSample``'s ``zeros`` padding; pixel ``p`` maps to
  the normalised coordinate ``(2p + 1) / size - 1`` (``align_corners=False``), exact for any size.
- ``native``: ``torchvision::deform_conv2d`` exported as the ONNX ``DeformConv`` node (opset 19;
  offsets and mask keep torchvision's layout, which is ONNX's). Runs where a runtime implements
  the node; ``onnx.reference`` does, ONNX Runtime does not.

:func:`exportable_deform_convs` swaps every :class:`~detector.model.deform.ModulatedDeformConv` of a
model for the chosen form while the export runs; parameters are shared, nothing is copied.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from detector.model.deform import ModulatedDeformConv

DCN_FORMS = ("decomposed", "native")
DEFORM_CONV_OPSET = 19


def deform_conv2d_decomposed(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None,
                             padding: tuple[int, int] = (0, 0), mask: Tensor | None = None) -> Tensor:
    """``torchvision.ops.deform_conv2d`` (stride 1, dilation 1) from GridSample, Mul and a 1x1 Conv.

    x: (N, C, H, W); offset: (N, 2 * G * K * K, H_out, W_out) with (dy, dx) pairs per group and
    tap; mask: (N, G * K * K, H_out, W_out) or None; weight: (C_out, C, K, K). Returns
    (N, C_out, H_out, W_out), H_out = H + 2 * pad_h - K + 1.
    """
    n, height, width = x.shape[0], x.shape[2], x.shape[3]
    # Channel counts and the kernel size are constants of the module: plain ints, so that an ONNX
    # trace keeps them static (the 1x1 Conv needs a weight of known shape); only N, H, W are dynamic.
    c_out, channels, k_h, k_w = (int(v) for v in weight.shape)
    taps = k_h * k_w
    groups = int(offset.shape[1]) // (2 * taps)
    out_h, out_w = offset.shape[-2], offset.shape[-1]
    pad_h, pad_w = padding
    dtype, device = x.dtype, x.device
    # Regular grid: output (i, j), tap (a, b) reads (i - pad_h + a, j - pad_w + b) before the offsets.
    rows = torch.arange(out_h, device=device).to(dtype)  # (H_out,)
    cols = torch.arange(out_w, device=device).to(dtype)  # (W_out,)
    tap_y = (torch.arange(k_h, device=device).to(dtype) - pad_h).repeat_interleave(k_w)  # (K*K,)
    tap_x = (torch.arange(k_w, device=device).to(dtype) - pad_w).repeat(k_h)  # (K*K,)
    base_y = tap_y.view(taps, 1, 1) + rows.view(1, -1, 1)  # (K*K, H_out, 1)
    base_x = tap_x.view(taps, 1, 1) + cols.view(1, 1, -1)  # (K*K, 1, W_out)
    offset = offset.reshape(n, groups, taps, 2, out_h, out_w)
    y = base_y + offset[:, :, :, 0]  # (N, G, K*K, H_out, W_out)
    x_pos = base_x + offset[:, :, :, 1]
    grid = torch.stack([(2 * x_pos + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)  # (N, G, KK, Ho, Wo, 2)
    grid = grid.reshape(n * groups, taps * out_h, out_w, 2)
    per_group = x.reshape(n * groups, channels // groups, height, width)
    sampled = F.grid_sample(per_group, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.reshape(n, groups, channels // groups, taps, out_h, out_w)  # (N, G, C/G, KK, Ho, Wo)
    if mask is not None:
        sampled = sampled * mask.reshape(n, groups, 1, taps, out_h, out_w)
    columns = sampled.reshape(n, channels * taps, out_h, out_w)  # channel-major, tap-minor: weight's order
    return F.conv2d(columns, weight.reshape(c_out, channels * taps, 1, 1), bias)


def _deform_conv_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
                          dilation_w, groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` -> ONNX ``DeformConv`` (opset 19) for the TorchScript exporter."""
    from torch.onnx import symbolic_helper

    stride = [symbolic_helper._get_const(v, "i", "stride") for v in (stride_h, stride_w)]
    pads = [symbolic_helper._get_const(v, "i", "pad") for v in (pad_h, pad_w)]
    dilation = [symbolic_helper._get_const(v, "i", "dilation") for v in (dilation_h, dilation_w)]
    kernel = symbolic_helper._get_tensor_sizes(weight)[-2:]
    inputs = [input, weight, offset, bias]
    if symbolic_helper._get_const(use_mask, "b", "use_mask"):
        inputs.append(mask)
    return g.op("DeformConv", *inputs, dilations_i=dilation, group_i=symbolic_helper._get_const(groups, "i", "groups"),
                kernel_shape_i=kernel, offset_group_i=symbolic_helper._get_const(offset_groups, "i", "offset_groups"),
                pads_i=pads + pads, strides_i=stride)


def register_native_symbolic() -> None:
    """Teach the TorchScript ONNX exporter ``torchvision::deform_conv2d`` (idempotent)."""
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv_symbolic, DEFORM_CONV_OPSET)


class ExportedDeformConv(nn.Module):
    """A :class:`ModulatedDeformConv`'s parameters run through one DCN form (same values)."""

    def __init__(self, dcn: ModulatedDeformConv, form: str) -> None:
        super().__init__()
        self.dcn = dcn
        self.deform_fn = deform_conv2d_decomposed if form == "decomposed" else deform_conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self.dcn._deform(x, self.deform_fn)


@contextlib.contextmanager
def exportable_deform_convs(model: nn.Module, form: str) -> Iterator[int]:
    """Within the block every ModulatedDeformConv of ``model`` runs as ``form``; yields their count."""
    if form not in DCN_FORMS:
        raise ValueError(f"dcn form '{form}' is unknown; choose one of {', '.join(DCN_FORMS)}")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ModulatedDeformConv):
                swapped.append((parent, name, child))
                setattr(parent, name, ExportedDeformConv(child, form))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
