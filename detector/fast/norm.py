"""Normalisation layers that keep bf16/fp16 activations in their dtype (fast paths, same values).

Under ``torch.autocast`` two norms of the detector leave the low-precision world:

- ``FrozenBatchNorm2d`` (torchvision) computes ``x * scale + shift`` with float32 buffers, so a
  bf16 conv output becomes a float32 tensor: every backbone activation is written, read by the
  ReLU and the residual add, and cast back to bf16 by the next conv -- about three times the bytes
  of a bf16 pass, in forward and backward (activations saved for backward are float32 too).
- ``GroupNorm`` is on autocast's float32 list: the bf16 conv output is cast to float32, and on
  CUDA ``native_group_norm`` makes its input NCHW-contiguous, so with channels_last every head
  layer also pays two transposes (one into the norm, one back for the next conv).

The classes here are drop-in subclasses with the same parameters and buffers (state dicts are
unchanged); :mod:`detector.fast.switch` swaps them in and out:

- :class:`DtypeKeepingFrozenBatchNorm2d`: one ``addcmul`` in the input's dtype (scale and shift
  rounded to it). In float32 it equals the reference ``x * scale + shift`` up to one rounding
  (``addcmul`` may fuse the multiply-add).
- :class:`FusedGroupNorm`: GroupNorm with an optional fused ReLU (``fuse_relu``), running the
  Triton kernels of :mod:`detector.fast.triton.group_norm` on CUDA (statistics in float32, any layout whose
  H and W merge, output in the input's dtype and layout). On tensors below ``MIN_FUSED_ELEMENTS``
  (the small pyramid levels, where three Triton launches cost more than the bytes they save), on
  the CPU, or when Triton is missing, it runs the reference ``F.group_norm`` (+ ReLU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d

LOW_PRECISION = (torch.bfloat16, torch.float16)


class DtypeKeepingFrozenBatchNorm2d(FrozenBatchNorm2d):
    """FrozenBatchNorm2d whose output keeps the input's dtype: ``addcmul(shift, x, scale)``.

    The buffers are frozen, so scale and shift are computed once per (dtype, buffer storage and
    version, inference mode) and reused: one kernel per call instead of about seven (the reference
    recomputes them every call), which matters where launches dominate (batch-1 inference).
    """

    def _scale_shift(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = (dtype, torch.is_inference_mode_enabled(), tuple((b.data_ptr(), b._version) for b in buffers))
        cached = self.__dict__.get("_scale_shift_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,) float32
            shift = self.bias - self.running_mean * scale
            value = (scale.view(1, -1, 1, 1).to(dtype), shift.view(1, -1, 1, 1).to(dtype))
        self.__dict__["_scale_shift_cache"] = (key, value)
        return value

    def forward(self, x: Tensor) -> Tensor:
        # (N, C, H, W) -> same shape, dtype and memory layout
        if torch.compiler.is_compiling():  # let the compiler see (and fuse) the plain expression
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))
        scale, shift = self._scale_shift(x.dtype)
        return torch.addcmul(shift, x, scale)


@functools.cache
def triton_group_norm():
    """The :mod:`detector.fast.triton.group_norm` module, or None where Triton cannot be imported."""
    try:
        from detector.fast.triton import group_norm as gn_triton
    except Exception:  # ImportError, or a Triton without a usable backend
        return None
    return gn_triton


class _FusedGroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, relu: bool) -> Tensor:
        kernels = triton_group_norm()
        y, mean, rstd = kernels.group_norm_forward(x, weight, bias, groups, eps, relu)
        ctx.groups = groups
        ctx.save_for_backward(x, y if relu else None, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y, mean, rstd, weight = ctx.saved_tensors
        kernels = triton_group_norm()
        if not kernels.mergeable(grad_out):
            grad_out = grad_out.contiguous(memory_format=torch.channels_last if x.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format)
        dx, dweight, dbias = kernels.group_norm_backward(grad_out, y, x, mean, rstd, weight, ctx.groups)
        return dx, dweight, dbias, None, None, None


def fused_group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, relu: bool) -> Tensor:
    """GroupNorm (+ ReLU) of x (N, C, H, W) through the Triton kernels; output in x's dtype and layout."""
    if not triton_group_norm().mergeable(x):
        x = x.contiguous()
    return _FusedGroupNormFunction.apply(x, weight, bias, groups, eps, relu)


MIN_FUSED_ELEMENTS = 1 << 20  # below this, launches cost more than bytes: the reference path runs


def can_fuse(x: Tensor, module: nn.GroupNorm) -> bool:
    """Whether the Triton path applies: CUDA, 4-D, affine, large enough, Triton importable."""
    return (x.is_cuda and x.dim() == 4 and module.affine and x.shape[1] == module.num_channels
            and x.numel() >= MIN_FUSED_ELEMENTS and triton_group_norm() is not None)


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (+ ReLU when ``fuse_relu``) computed in the input's dtype; see the module doc.

    Autocast is switched off inside: a bf16 conv output stays bf16 (statistics in float32), a
    float32 input is normalised in float32.
    """

    fuse_relu: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not can_fuse(x, self):
            out = super().forward(x)
            return F.relu(out) if self.fuse_relu else out
        with torch.autocast(x.device.type, enabled=False):
            return fused_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.fuse_relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_relu=True" if self.fuse_relu else "")
