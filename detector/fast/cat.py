"""The ``cat`` aggregation (BatchNorm -> ReLU -> pair mix) as one fused autograd function.

:func:`fused_concat_reduce` computes exactly :class:`detector.model.ops.ConcatReduce`'s function with
its parameters and buffers -- BatchNorm with batch statistics in training (updating the running
statistics the way ``nn.BatchNorm2d`` does: momentum or cumulative average, unbiased running
variance, ``num_batches_tracked``), with running statistics in eval -- without materialising the
concatenated 2w-channel map: the kernels of :mod:`detector.fast.triton.cat` read x and y in NHWC
and write the w-channel output directly (channels_last). Statistics and the folded BatchNorm
(``scale = gamma / std``, ``shift = beta - mean * scale``) are float32 (float64 for float64 inputs).

Runs where the Triton kernels run (CUDA; CPU under ``TRITON_INTERPRET=1``, the tests);
:class:`detector.fast.fpn.FastConcatReduce` falls back to plain torch elsewhere.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from detector.model.ops import ConcatReduce


def triton_cat_available(x: Tensor) -> bool:
    """Whether the fused kernels can run on x's device."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import detector.fast.triton.cat  # noqa: F401
    except ImportError:
        return False
    return True


class _FusedConcatReduce(torch.autograd.Function):
    """x_rows, y_rows (P, w) NHWC rows -> (P, w) rows; BatchNorm given as mean / invstd (2w,)."""

    @staticmethod
    def forward(ctx, x_rows, y_rows, gamma, beta, mix, mean, invstd, batch_stats):
        from detector.fast.triton import cat as kernels

        width = x_rows.shape[1]
        scale = gamma.to(mean.dtype) * invstd
        shift = beta.to(mean.dtype) - mean * scale
        mix_acc = mix.to(mean.dtype).contiguous()  # (w, 2)
        out = x_rows.new_empty(x_rows.shape)
        for half, z in enumerate((x_rows, y_rows)):
            channels, outputs = _half_slices(half, width)
            kernels.cat_forward(z, scale[channels], shift[channels], mix_acc[outputs], out, half)
        ctx.save_for_backward(x_rows, y_rows, gamma, beta, mix, mean, invstd, scale, shift, mix_acc)
        ctx.batch_stats = batch_stats
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from detector.fast.triton import cat as kernels

        x_rows, y_rows, gamma, beta, mix, mean, invstd, scale, shift, mix_acc = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        width, count = x_rows.shape[1], x_rows.shape[0]
        sum_du = torch.zeros_like(mean)  # per BN channel: sum of the BN-output gradient (= grad beta)
        sum_du_xhat = torch.zeros_like(mean)  # ... times the normalised input (= grad gamma)
        grad_mix = torch.zeros_like(mix_acc)
        halves = list(enumerate((x_rows, y_rows)))
        for half, z in halves:
            channels, outputs = _half_slices(half, width)
            kernels.cat_backward_sums(z, grad_out, scale[channels], shift[channels], mix_acc[outputs],
                                      mean[channels], invstd[channels], sum_du[channels], sum_du_xhat[channels],
                                      grad_mix[outputs], half)
        mean_du, mean_du_xhat = sum_du / count, sum_du_xhat / count
        grads = []
        for half, z in halves:
            channels, outputs = _half_slices(half, width)
            grad_z = torch.empty_like(z)
            kernels.cat_backward_input(z, grad_out, scale[channels], shift[channels], mix_acc[outputs],
                                       mean[channels], invstd[channels], mean_du[channels], mean_du_xhat[channels],
                                       grad_z, half, ctx.batch_stats)
            grads.append(grad_z)
        return (grads[0], grads[1], sum_du_xhat.to(gamma.dtype), sum_du.to(beta.dtype), grad_mix.to(mix.dtype),
                None, None, None)


def _half_slices(half: int, width: int) -> tuple[slice, slice]:
    """BN channels and outputs (rows of the (w, 2) mix) of half 0 (x) or 1 (y)."""
    return slice(half * width, (half + 1) * width), slice(half * width // 2, (half + 1) * width // 2)


def _batch_stats(z: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of z (N, C, H, W), in dtype."""
    if z.is_cuda and dtype == torch.float32:
        mean, invstd = torch.batch_norm_stats(z, eps)  # float32 for bf16/fp16/fp32, one pass, any layout
        return mean, invstd.pow(-2) - eps, invstd
    var, mean = torch.var_mean(z.to(dtype), dim=(0, 2, 3), unbiased=False)
    return mean, var, torch.rsqrt(var + eps)


def fused_concat_reduce(module: ConcatReduce, x: Tensor, y: Tensor) -> Tensor:
    """``module(x, y)`` through the fused kernels: (N, w, H, W) x 2 -> (N, w, H, W), x's memory format."""
    norm, _, conv = module.reduce
    n, width, height, w_size = x.shape
    if width % 2:
        raise ValueError(f"fused_concat_reduce: the width must be even, got {width}")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, y = (t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (x, y))
    x_rows, y_rows = (t.permute(0, 2, 3, 1).reshape(-1, width) for t in (x, y))  # views
    batch_stats = norm.training or norm.running_mean is None
    if batch_stats:
        stats = [_batch_stats(t, norm.eps, acc) for t in (x, y)]
        mean = torch.cat([s[0] for s in stats])
        var = torch.cat([s[1] for s in stats])
        invstd = torch.cat([s[2] for s in stats])
        if norm.training and norm.track_running_stats:
            _update_running_stats(norm, mean, var, count=x_rows.shape[0])
    else:
        mean = norm.running_mean.to(acc)
        invstd = torch.rsqrt(norm.running_var.to(acc) + norm.eps)
    gamma = norm.weight if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(mean)
    rows = _FusedConcatReduce.apply(x_rows, y_rows, gamma, beta, conv.weight.view(width, 2), mean.detach(),
                                    invstd.detach(), batch_stats)
    out = rows.view(n, height, w_size, width).permute(0, 3, 1, 2)  # channels_last
    return out if channels_last else out.contiguous()


@torch.no_grad()
def _update_running_stats(norm: torch.nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """nn.BatchNorm2d's training-mode update of running_mean / running_var / num_batches_tracked."""
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    norm.running_mean.mul_(1 - momentum).add_(mean.to(norm.running_mean.dtype), alpha=momentum)
    norm.running_var.mul_(1 - momentum).add_(unbiased.to(norm.running_var.dtype), alpha=momentum)
