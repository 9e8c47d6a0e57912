"""The ``deform`` fast path: a model's DCNs call the faster deformable-convolution kernel.

:class:`FastModulatedDeformConv` is :class:`detector.model.deform.ModulatedDeformConv` with the
same parameters, buffers and state dict keys; only the kernel differs. Its ``kernel`` is one of

- ``fast``: always :func:`detector.fast.deform.deform_conv2d_fast` (Triton sampler on CUDA, torch
  sampler elsewhere), in the autocast dtype (bfloat16 included, so no float32 detour and the
  offset predictor runs in the autocast dtype as any conv would);
- ``auto``: per call, the fast kernel where it pays (CUDA with Triton, or bfloat16) and
  ``torchvision.ops.deform_conv2d`` elsewhere (:func:`detector.fast.deform.deform_conv2d_auto`).

The kernel is an attribute of each module, set by :func:`set_deform_kernel` (through
:func:`detector.fast.switch.set_fast_paths`), so models in one process may differ.
"""
from __future__ import annotations

from torch import Tensor, nn

from detector.fast.deform import packed_impl, select_deform_conv2d
from detector.model.deform import DEFORM_IMPLS, ModulatedDeformConv


class FastModulatedDeformConv(ModulatedDeformConv):
    """A ModulatedDeformConv whose kernel is ``self.kernel`` (``fast`` or ``auto``)."""

    kernel = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        deform_fn = select_deform_conv2d(self.kernel)
        offset_mask = self.predict_offset_mask(x)  # (N, 3*G*K*K, H, W)
        packed = packed_impl(deform_fn, x)
        if packed is not None:  # the fast kernels split offsets / mask logits and apply the sigmoid themselves
            return packed(x, offset_mask, self.weight.to(x.dtype), self.bias.to(x.dtype),
                          padding=(self.padding, self.padding))
        return self._deform_split(x, offset_mask, deform_fn)


def set_deform_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Every DCN of ``model`` calls ``kernel`` (one of DEFORM_IMPLS; ``torchvision`` = the reference
    module). Parameters and state dict keys are unchanged; returns ``model``."""
    if kernel not in DEFORM_IMPLS:
        raise ValueError(f"deform kernel '{kernel}' is unknown; choose one of {', '.join(DEFORM_IMPLS)}")
    for module in model.modules():
        if not isinstance(module, ModulatedDeformConv):
            continue
        if kernel == "torchvision":
            module.__class__ = ModulatedDeformConv
            module.__dict__.pop("kernel", None)
        else:
            module.__class__ = FastModulatedDeformConv
            module.kernel = kernel
    return model


def deform_kernel(model: nn.Module) -> str | None:
    """The kernel ``model``'s DCNs call (None without DCNs; set_deform_kernel sets them all alike)."""
    for module in model.modules():
        if isinstance(module, ModulatedDeformConv):
            return getattr(module, "kernel", "torchvision") if type(module) is FastModulatedDeformConv else "torchvision"
    return None
