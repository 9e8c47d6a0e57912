"""Faster equivalents of two searched-FPN pieces (the ``resize`` and ``cat_reduce`` fast paths).

- :func:`resize_gemm` computes ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
  as two small GEMMs with interpolation matrices (width, then height) when it upsamples
  (downsampling stays with interpolate, which measured faster there). On an H100 in bf16 +
  channels_last the interpolate kernels took ~1 ms per call forward and more backward
  (atomics) in a nasfcos step; GEMMs read and write each map once, in the input's layout, and
  their backward is two more GEMMs.
- :class:`FastConcatReduce` replaces the ``cat`` aggregation (BatchNorm -> ReLU -> grouped 1x1
  convolution with groups = width, two input channels per output channel, which cuDNN runs with
  slow direct kernels) by fused Triton kernels on CUDA (:mod:`detector.fast.cat`: no concatenated
  map, one pass forward, two backward) and elsewhere by the same function written as two
  per-channel multiply-adds.

Both compute the reference's function; rounding differs only in the compute dtype (interpolation
weights are made in float64 and cast to the input's dtype). tests/fast/test_fast_paths.py compares
values and gradients with the reference in float64, both layouts.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from detector.fast.cat import fused_concat_reduce, triton_cat_available
from detector.model.ops import ConcatReduce
from detector.model.searched_fpn import FPNCell, SearchedFPNModule, resize_to


def _interpolation_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(out_size, in_size) weights of 1-D linear interpolation, align_corners=False (PyTorch's rule).

    Cached per mode: a matrix made under ``torch.inference_mode`` is an inference tensor, which
    autograd cannot save for a later training step.
    """
    return _cached_matrix(in_size, out_size, dtype, device, torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=256)
def _cached_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device, inference: bool) -> Tensor:
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def resize_gemm(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (N, C, H, W) -> (N, C, *size) by two GEMMs; x itself when already that size.

    Same function as ``F.interpolate(mode="bilinear", align_corners=False)``; keeps x's memory
    format (channels_last in, channels_last out). Under autocast it runs in the autocast dtype.
    """
    out_h, out_w = (int(s) for s in size)
    n, c, h, w = x.shape
    if out_h <= h and out_w <= w:  # same size or downsampling: the reference (faster there, experiments/PERF.md)
        return resize_to(x, (out_h, out_w))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(dtype)
    along_h = _interpolation_matrix(h, out_h, dtype, x.device)  # (out_h, h)
    along_w = _interpolation_matrix(w, out_w, dtype, x.device)  # (out_w, w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).reshape(n * h, w, c)  # NHWC, free
        wide = torch.matmul(along_w, rows)  # (n*h, out_w, c)
        tall = torch.matmul(along_h, wide.view(n, h, out_w * c))  # (n, out_h, out_w*c)
        return tall.view(n, out_h, out_w, c).permute(0, 3, 1, 2)  # channels_last
    planes = x.reshape(n * c, h, w)
    wide = torch.matmul(planes, along_w.t())  # (n*c, h, out_w)
    return torch.matmul(along_h, wide).view(n, c, out_h, out_w)


class FastFPNCell(FPNCell):
    resize = staticmethod(resize_gemm)


class FastSearchedFPNModule(SearchedFPNModule):
    resize = staticmethod(resize_gemm)


class FastConcatReduce(ConcatReduce):
    """``cat`` through the fused Triton kernels of :mod:`detector.fast.cat` where they run (CUDA), else
    with its grouped 1x1 conv as ``z[:, 0::2] * w0 + z[:, 1::2] * w1`` (same parameters)."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] % 2 == 0 and triton_cat_available(x):
            return fused_concat_reduce(self, x, y)
        norm, relu, conv = self.reduce
        z = relu(norm(torch.cat([x, y], dim=1)))  # (N, 2w, H, W)
        weight = conv.weight.to(z.dtype).view(1, -1, 2, 1, 1)  # (1, w, 2, 1, 1): output j reads 2j, 2j+1
        return torch.addcmul(z[:, 0::2] * weight[:, :, 0], z[:, 1::2], weight[:, :, 1])  # (N, w, H, W)


# reference class -> fast class, for detector.fast.switch
RESIZE_CLASSES = {FPNCell: FastFPNCell, SearchedFPNModule: FastSearchedFPNModule}
CAT_REDUCE_CLASSES = {ConcatReduce: FastConcatReduce}
