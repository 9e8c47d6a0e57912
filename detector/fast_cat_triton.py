"""Fused Triton kernels for the searched FPN's ``cat`` aggregation (BatchNorm -> ReLU -> pair mix).

``cat`` is ``conv1x1_grouped(relu(bn(concat(x, y))))`` with ``groups = w`` and two input channels
per output (:class:`detector.ops.ConcatReduce`): output ``j < w/2`` mixes channels ``2j, 2j+1`` of
``x``, output ``j >= w/2`` channels ``2j - w, 2j - w + 1`` of ``y``. Unfused, a training step runs
a concat, BatchNorm, ReLU and two strided multiply-adds forward and as many passes backward, each
over the 2w-channel map; here each half (x, then y) takes one kernel forward and two backward,
reading NHWC rows once per kernel:

- ``forward``: ``out[p, j] = w0[j] * relu(z[p, 2j] * scale + shift) + w1[j] * relu(z[p, 2j+1] * ...)``
  with the BatchNorm folded into a per-channel ``scale, shift`` (float32; float64 for float64 inputs);
- ``backward`` pass 1: per-channel sums over pixels of the BatchNorm-input gradient ``du`` and of
  ``du * xhat`` (the beta and gamma gradients) and of ``g * relu(u)`` (the mix weights' gradient),
  each of ~``SUM_PROGRAMS`` programs summing a long run of pixels in registers, then one atomic
  add per channel;
- ``backward`` pass 2: ``dz = scale * (du - mean(du) - xhat * mean(du * xhat))`` with batch
  statistics (training), ``dz = scale * du`` with running statistics (eval).

Layouts: ``z`` (P, w) NHWC rows of one half; ``out`` / ``grad_out`` (P, w) rows, the half's
outputs at column offset ``half * w/2``. Runs on CUDA; ``TRITON_INTERPRET=1`` runs it on CPU (tests).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

BLOCK_PIXELS = 64
SUM_PROGRAMS = 512  # programs of the backward's reduction kernel (a few per SM of an H100)


@triton.jit
def _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pairs, width,
                     BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Both channels of each pair, before and after BN: (ok mask, za, zb, ua, ub), (pixels, pairs)."""
    ok = (pixels < num_pixels)[:, None] & (pairs < width // 2)[None, :]
    row = (pixels.to(tl.int64) * width)[:, None]
    scale_a = tl.load(scale_ptr + 2 * pairs, mask=pairs < width // 2, other=0.0)
    za = tl.load(z_ptr + row + (2 * pairs)[None, :], mask=ok, other=0.0).to(scale_a.dtype)
    zb = tl.load(z_ptr + row + (2 * pairs + 1)[None, :], mask=ok, other=0.0).to(scale_a.dtype)
    scale_b = tl.load(scale_ptr + 2 * pairs + 1, mask=pairs < width // 2, other=0.0)
    shift_a = tl.load(shift_ptr + 2 * pairs, mask=pairs < width // 2, other=0.0)
    shift_b = tl.load(shift_ptr + 2 * pairs + 1, mask=pairs < width // 2, other=0.0)
    ua = za * scale_a[None, :] + shift_a[None, :]
    ub = zb * scale_b[None, :] + shift_b[None, :]
    return ok, za, zb, ua, ub


@triton.jit
def _cat_forward_kernel(z_ptr, scale_ptr, shift_ptr, mix_ptr, out_ptr, num_pixels, width, out_offset,
                        BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    pixels = tl.program_id(0) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pairs = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    ok, _, _, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pairs, width,
                                        BLOCK_PIXELS, BLOCK_PAIRS)
    w0 = tl.load(mix_ptr + 2 * pairs, mask=pairs < width // 2, other=0.0).to(ua.dtype)
    w1 = tl.load(mix_ptr + 2 * pairs + 1, mask=pairs < width // 2, other=0.0).to(ua.dtype)
    out = w0[None, :] * tl.maximum(ua, 0.0) + w1[None, :] * tl.maximum(ub, 0.0)
    target = out_ptr + (pixels.to(tl.int64) * width)[:, None] + (out_offset + pairs)[None, :]
    tl.store(target, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bn_input_grads(g_ptr, mix_ptr, pixels, pairs, ok, ua, ub, width, out_offset):
    """Gradient at the BN outputs of both channels of each pair, and the incoming output gradient."""
    g = tl.load(g_ptr + (pixels.to(tl.int64) * width)[:, None] + (out_offset + pairs)[None, :],
                mask=ok, other=0.0).to(ua.dtype)
    w0 = tl.load(mix_ptr + 2 * pairs, mask=pairs < width // 2, other=0.0).to(ua.dtype)
    w1 = tl.load(mix_ptr + 2 * pairs + 1, mask=pairs < width // 2, other=0.0).to(ua.dtype)
    dua = tl.where(ua > 0.0, g * w0[None, :], 0.0)
    dub = tl.where(ub > 0.0, g * w1[None, :], 0.0)
    return g, dua, dub


@triton.jit
def _cat_backward_sums_kernel(z_ptr, g_ptr, scale_ptr, shift_ptr, mix_ptr, mean_ptr, invstd_ptr,
                              sum_du_ptr, sum_du_xhat_ptr, grad_mix_ptr, num_pixels, width, out_offset,
                              pixels_per_program,
                              BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    # Each program sums over pixels_per_program pixels in registers and adds its totals once: few
    # programs, so few atomics on the same 3 x w addresses (they all target the same channels).
    pairs = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    pair_ok = pairs < width // 2
    mean_a = tl.load(mean_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
    mean_b = tl.load(mean_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
    invstd_a = tl.load(invstd_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
    invstd_b = tl.load(invstd_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
    du_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_xhat_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_xhat_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    mix_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    mix_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    first = tl.program_id(0) * pixels_per_program
    for start in range(first, first + pixels_per_program, BLOCK_PIXELS):
        pixels = start + tl.arange(0, BLOCK_PIXELS)
        ok, za, zb, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pairs, width,
                                              BLOCK_PIXELS, BLOCK_PAIRS)
        g, dua, dub = _bn_input_grads(g_ptr, mix_ptr, pixels, pairs, ok, ua, ub, width, out_offset)
        du_a += tl.sum(dua, axis=0)
        du_b += tl.sum(dub, axis=0)
        du_xhat_a += tl.sum(dua * tl.where(ok, (za - mean_a) * invstd_a, 0.0), axis=0)
        du_xhat_b += tl.sum(dub * tl.where(ok, (zb - mean_b) * invstd_b, 0.0), axis=0)
        mix_a += tl.sum(g * tl.maximum(ua, 0.0), axis=0)
        mix_b += tl.sum(g * tl.maximum(ub, 0.0), axis=0)
    tl.atomic_add(sum_du_ptr + 2 * pairs, du_a, mask=pair_ok, sem="relaxed")
    tl.atomic_add(sum_du_ptr + 2 * pairs + 1, du_b, mask=pair_ok, sem="relaxed")
    tl.atomic_add(sum_du_xhat_ptr + 2 * pairs, du_xhat_a, mask=pair_ok, sem="relaxed")
    tl.atomic_add(sum_du_xhat_ptr + 2 * pairs + 1, du_xhat_b, mask=pair_ok, sem="relaxed")
    tl.atomic_add(grad_mix_ptr + 2 * pairs, mix_a, mask=pair_ok, sem="relaxed")
    tl.atomic_add(grad_mix_ptr + 2 * pairs + 1, mix_b, mask=pair_ok, sem="relaxed")


@triton.jit
def _cat_backward_input_kernel(z_ptr, g_ptr, scale_ptr, shift_ptr, mix_ptr, mean_ptr, invstd_ptr,
                               mean_du_ptr, mean_du_xhat_ptr, grad_z_ptr, num_pixels, width, out_offset,
                               BATCH_STATS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    pixels = tl.program_id(0) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pairs = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    ok, za, zb, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pairs, width,
                                          BLOCK_PIXELS, BLOCK_PAIRS)
    _, dua, dub = _bn_input_grads(g_ptr, mix_ptr, pixels, pairs, ok, ua, ub, width, out_offset)
    pair_ok = pairs < width // 2
    scale_a = tl.load(scale_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
    scale_b = tl.load(scale_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
    if BATCH_STATS:  # the batch mean and variance depend on z too
        mean_a = tl.load(mean_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
        mean_b = tl.load(mean_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
        invstd_a = tl.load(invstd_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
        invstd_b = tl.load(invstd_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
        dua -= tl.load(mean_du_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :] + (za - mean_a) * invstd_a * \
            tl.load(mean_du_xhat_ptr + 2 * pairs, mask=pair_ok, other=0.0)[None, :]
        dub -= tl.load(mean_du_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :] + (zb - mean_b) * invstd_b * \
            tl.load(mean_du_xhat_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0)[None, :]
    row = grad_z_ptr + (pixels.to(tl.int64) * width)[:, None]
    tl.store(row + (2 * pairs)[None, :], (scale_a * dua).to(grad_z_ptr.dtype.element_ty), mask=ok)
    tl.store(row + (2 * pairs + 1)[None, :], (scale_b * dub).to(grad_z_ptr.dtype.element_ty), mask=ok)


def _grid(num_pixels: int, width: int) -> tuple[tuple[int, int], int]:
    block_pairs = min(64, triton.next_power_of_2(max(1, width // 2)))
    return (triton.cdiv(num_pixels, BLOCK_PIXELS), triton.cdiv(width // 2, block_pairs)), block_pairs


def cat_forward(z: Tensor, scale: Tensor, shift: Tensor, mix: Tensor, out: Tensor, half: int) -> None:
    """Write the half's outputs: z (P, w) rows, scale/shift (w,), mix (w/2, 2), out (P, w) rows."""
    num_pixels, width = z.shape
    grid, block_pairs = _grid(num_pixels, width)
    _cat_forward_kernel[grid](z, scale, shift, mix, out, num_pixels, width, half * (width // 2),
                              BLOCK_PIXELS=BLOCK_PIXELS, BLOCK_PAIRS=block_pairs)


def cat_backward_sums(z: Tensor, grad_out: Tensor, scale: Tensor, shift: Tensor, mix: Tensor, mean: Tensor,
                      invstd: Tensor, sum_du: Tensor, sum_du_xhat: Tensor, grad_mix: Tensor, half: int) -> None:
    """Accumulate (atomics) the half's per-channel sums: sum_du, sum_du_xhat (w,), grad_mix (w/2, 2)."""
    num_pixels, width = z.shape
    (_, pair_blocks), block_pairs = _grid(num_pixels, width)
    # ~SUM_PROGRAMS programs in all, each over a multiple of BLOCK_PIXELS pixels
    per_program = BLOCK_PIXELS * triton.cdiv(num_pixels, BLOCK_PIXELS * max(1, SUM_PROGRAMS // pair_blocks))
    grid = (triton.cdiv(num_pixels, per_program), pair_blocks)
    _cat_backward_sums_kernel[grid](z, grad_out, scale, shift, mix, mean, invstd, sum_du, sum_du_xhat, grad_mix,
                                    num_pixels, width, half * (width // 2), per_program,
                                    BLOCK_PIXELS=BLOCK_PIXELS, BLOCK_PAIRS=block_pairs)


def cat_backward_input(z: Tensor, grad_out: Tensor, scale: Tensor, shift: Tensor, mix: Tensor, mean: Tensor,
                       invstd: Tensor, mean_du: Tensor, mean_du_xhat: Tensor, grad_z: Tensor, half: int,
                       batch_stats: bool) -> None:
    """Write the gradient of the half's input rows grad_z (P, w)."""
    num_pixels, width = z.shape
    grid, block_pairs = _grid(num_pixels, width)
    _cat_backward_input_kernel[grid](z, grad_out, scale, shift, mix, mean, invstd, mean_du, mean_du_xhat, grad_z,
                                     num_pixels, width, half * (width // 2), BATCH_STATS=batch_stats,
                                     BLOCK_PIXELS=BLOCK_PIXELS, BLOCK_PAIRS=block_pairs)
