"""Modulated deformable convolution (DCNv2), the ``dcn`` op of both search spaces.

Structure (DESIGN section 4, as in the authors' ``DCN`` layer): a plain KxK convolution *with
bias* predicts, per output position, ``offset_groups * K*K`` (dy, dx) offsets and as many
modulation masks -- for the default 3x3 with 2 offset groups that is 2*2*9 + 2*9 = 54 channels.
That predictor starts at exactly zero (weight and bias), so a fresh DCN samples the regular grid
with every mask at sigmoid(0) = 0.5. The deformable convolution itself has a bias; its weight
starts uniform in +-1/sqrt(fan_in) and its bias at zero (the authors' initialisation).

Channel layout of the predictor output: the first ``2 * offset_groups * K*K`` channels are the
offsets in ``torchvision.ops.deform_conv2d``'s layout, the last ``offset_groups * K*K`` the mask
logits. (The authors' layout -- chunk into o1, o2, mask, offsets = cat(o1, o2) -- is the same.)

Precision: ``torchvision.ops.deform_conv2d`` has no bfloat16 kernel. Whenever autocast is active
on the input's device (any autocast dtype) or the input itself is bfloat16, this module runs the
whole DCN -- offset predictor included, so the sampling positions keep full precision -- in
float32 with autocast disabled locally, and casts the result back to the autocast dtype (or the
input's dtype). Outside autocast, float32/float16/float64 inputs run natively.

Kernel: this reference module always calls ``torchvision.ops.deform_conv2d``. The per-model
fast-path switch (:func:`detector.fast.switch.set_fast_paths`, argument ``deform``) turns a model's
DCNs into :class:`detector.fast.deform_layer.FastModulatedDeformConv` (same parameters and state
dict keys), which calls the faster kernel of :mod:`detector.fast.deform` (``fast``) or picks per
call (``auto``). The choice belongs to the model, not the process: two models in one process (two
trials in threads of ``executor=local``) may use different kernels.
torchvision's DCN is 10-17x slower than a plain conv of the same shape on an H100 (DESIGN section
10); the fast kernel runs the DESIGN shape 6.4x faster in bf16 (experiments/PERF.md).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

DEFORM_IMPLS = ("torchvision", "fast", "auto")  # the kernels a model's DCNs can call (see the docstring)


def autocast_enabled(x: Tensor) -> bool:
    """Whether autocast is on for x's device type."""
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class ModulatedDeformConv(nn.Module):
    """DCNv2: (N, C_in, H, W) -> (N, C_out, H, W), stride 1, 'same' padding.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size K (3 in both search spaces).
        offset_groups: deformable groups; each group of input channels gets its own offsets/masks.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, offset_groups: int = 2) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ModulatedDeformConv: kernel_size must be odd, got {kernel_size}")
        if in_channels % offset_groups != 0:
            raise ValueError(
                f"ModulatedDeformConv: in_channels {in_channels} is not divisible by offset_groups {offset_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.offset_groups = offset_groups
        self.padding = kernel_size // 2
        taps = offset_groups * kernel_size * kernel_size
        self.num_offsets = 2 * taps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, padding=self.padding, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def predict_offset_mask(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, 3*G*K*K, H, W): offsets then mask logits, from the predictor conv."""
        # Parameters follow x's dtype (a no-op unless a bf16-cast module runs its float32 path); under
        # autocast conv2d casts them itself, once per step for the head's levels sharing them (cast cache).
        weight, bias = self.offset_mask.weight, self.offset_mask.bias
        if not autocast_enabled(x):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return nn.functional.conv2d(x, weight, bias, padding=self.padding)

    def _deform(self, x: Tensor, deform_fn=deform_conv2d) -> Tensor:
        return self._deform_split(x, self.predict_offset_mask(x), deform_fn)

    def _deform_split(self, x: Tensor, offset_mask: Tensor, deform_fn) -> Tensor:
        offset = offset_mask[:, : self.num_offsets]  # (N, 2*G*K*K, H, W)
        mask = offset_mask[:, self.num_offsets:].sigmoid()  # (N, G*K*K, H, W)
        return deform_fn(
            x, offset, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=(self.padding, self.padding), mask=mask
        )  # (N, C_out, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); see the module docstring for precision handling."""
        device_type = x.device.type
        autocast_on = autocast_enabled(x)
        if not autocast_on and x.dtype != torch.bfloat16:
            return self._deform(x)
        out_dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
        with torch.autocast(device_type, enabled=False):
            out = self._deform(x.float())
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"offset_groups={self.offset_groups}"
        )
