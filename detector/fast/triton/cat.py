"""Fused Triton kernels for the searched FPN's ``cat`` aggregation (BatchNorm -> ReLU -> pair mix).

``cat`` is ``conv1x1_grouped(relu(bn(concat(x, y))))`` with ``groups = w`` and two input channels
per output (:class:`detector.model.ops.ConcatReduce`): output ``j < w/2`` mixes channels ``2j, 2j+1`` of
``x``, output ``j >= w/2`` channels ``2j - w, 2j - w + 1`` of ``y``. Unfused, a training step runs
a concat, BatchNorm, ReLU and two strided multiply-adds forward and as many passes backward, each
over the 2w-channel map; here each half (x, then y) takes one kernel forward and two backward,
reading NHWC rows once per kernel (channel pairs are loaded and stored as contiguous rows and
split / joined in registers):

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
def _vector_pairs(ptr, pair0, width, BLOCK_PAIRS: tl.constexpr):
    """Per-channel vector entries of channels 2j and 2j+1 of pairs pair0.. as two (BLOCK_PAIRS,) rows."""
    channels = 2 * pair0 + tl.arange(0, 2 * BLOCK_PAIRS)
    values = tl.load(ptr + channels, mask=channels < width, other=0.0)
    return tl.split(tl.reshape(values, (BLOCK_PAIRS, 2)))


@triton.jit
def _row_pairs(ptr, pixels, num_pixels, pair0, width, dtype,
               BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Channels 2j and 2j+1 of NHWC rows, one contiguous load split in two (pixels, pairs) tiles."""
    channels = 2 * pair0 + tl.arange(0, 2 * BLOCK_PAIRS)
    ok = (pixels < num_pixels)[:, None] & (channels < width)[None, :]
    values = tl.load(ptr + (pixels.to(tl.int64) * width)[:, None] + channels[None, :], mask=ok, other=0.0)
    return tl.split(tl.reshape(values.to(dtype), (BLOCK_PIXELS, BLOCK_PAIRS, 2)))


@triton.jit
def _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pair0, width,
                     BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Both channels of each pair, before and after BN: (ok mask, za, zb, ua, ub), (pixels, pairs)."""
    pairs = pair0 + tl.arange(0, BLOCK_PAIRS)
    ok = (pixels < num_pixels)[:, None] & (pairs < width // 2)[None, :]
    scale_a, scale_b = _vector_pairs(scale_ptr, pair0, width, BLOCK_PAIRS)
    shift_a, shift_b = _vector_pairs(shift_ptr, pair0, width, BLOCK_PAIRS)
    za, zb = _row_pairs(z_ptr, pixels, num_pixels, pair0, width, scale_a.dtype, BLOCK_PIXELS, BLOCK_PAIRS)
    ua = za * scale_a[None, :] + shift_a[None, :]
    ub = zb * scale_b[None, :] + shift_b[None, :]
    return ok, za, zb, ua, ub


@triton.jit
def _cat_forward_kernel(z_ptr, scale_ptr, shift_ptr, mix_ptr, out_ptr, num_pixels, width, out_offset,
                        BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    pixels = tl.program_id(0) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pair0 = tl.program_id(1) * BLOCK_PAIRS
    ok, _, _, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pair0, width,
                                        BLOCK_PIXELS, BLOCK_PAIRS)
    w0, w1 = _vector_pairs(mix_ptr, pair0, width, BLOCK_PAIRS)
    out = w0.to(ua.dtype)[None, :] * tl.maximum(ua, 0.0) + w1.to(ua.dtype)[None, :] * tl.maximum(ub, 0.0)
    columns = out_offset + pair0 + tl.arange(0, BLOCK_PAIRS)
    target = out_ptr + (pixels.to(tl.int64) * width)[:, None] + columns[None, :]
    tl.store(target, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bn_input_grads(g_ptr, mix_ptr, pixels, pair0, ok, ua, ub, width, out_offset, BLOCK_PAIRS: tl.constexpr):
    """Gradient at the BN outputs of both channels of each pair, and the incoming output gradient."""
    columns = out_offset + pair0 + tl.arange(0, BLOCK_PAIRS)
    g = tl.load(g_ptr + (pixels.to(tl.int64) * width)[:, None] + columns[None, :], mask=ok, other=0.0).to(ua.dtype)
    w0, w1 = _vector_pairs(mix_ptr, pair0, width, BLOCK_PAIRS)
    dua = tl.where(ua > 0.0, g * w0.to(ua.dtype)[None, :], 0.0)
    dub = tl.where(ub > 0.0, g * w1.to(ua.dtype)[None, :], 0.0)
    return g, dua, dub


@triton.jit
def _add_pairs(ptr, pair0, width, a, b, BLOCK_PAIRS: tl.constexpr):
    """Atomically add (BLOCK_PAIRS,) values a to channels 2j and b to 2j+1."""
    channels = 2 * pair0 + tl.arange(0, 2 * BLOCK_PAIRS)
    values = tl.reshape(tl.join(a, b), (2 * BLOCK_PAIRS,))
    tl.atomic_add(ptr + channels, values, mask=channels < width, sem="relaxed")


@triton.jit
def _cat_backward_sums_kernel(z_ptr, g_ptr, scale_ptr, shift_ptr, mix_ptr, mean_ptr, invstd_ptr,
                              sum_du_ptr, sum_du_xhat_ptr, grad_mix_ptr, num_pixels, width, out_offset,
                              pixels_per_program,
                              BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    # Each program sums over pixels_per_program pixels in registers and adds its totals once: few
    # programs, so few atomics on the same 3 x w addresses (they all target the same channels).
    pair0 = tl.program_id(1) * BLOCK_PAIRS
    mean_a, mean_b = _vector_pairs(mean_ptr, pair0, width, BLOCK_PAIRS)
    invstd_a, invstd_b = _vector_pairs(invstd_ptr, pair0, width, BLOCK_PAIRS)
    du_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_xhat_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    du_xhat_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    mix_a = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    mix_b = tl.zeros((BLOCK_PAIRS,), dtype=mean_a.dtype)
    first = tl.program_id(0) * pixels_per_program
    for start in range(first, first + pixels_per_program, BLOCK_PIXELS):
        pixels = start + tl.arange(0, BLOCK_PIXELS)
        ok, za, zb, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pair0, width,
                                              BLOCK_PIXELS, BLOCK_PAIRS)
        g, dua, dub = _bn_input_grads(g_ptr, mix_ptr, pixels, pair0, ok, ua, ub, width, out_offset, BLOCK_PAIRS)
        du_a += tl.sum(dua, axis=0)
        du_b += tl.sum(dub, axis=0)
        du_xhat_a += tl.sum(dua * tl.where(ok, (za - mean_a[None, :]) * invstd_a[None, :], 0.0), axis=0)
        du_xhat_b += tl.sum(dub * tl.where(ok, (zb - mean_b[None, :]) * invstd_b[None, :], 0.0), axis=0)
        mix_a += tl.sum(g * tl.maximum(ua, 0.0), axis=0)
        mix_b += tl.sum(g * tl.maximum(ub, 0.0), axis=0)
    _add_pairs(sum_du_ptr, pair0, width, du_a, du_b, BLOCK_PAIRS)
    _add_pairs(sum_du_xhat_ptr, pair0, width, du_xhat_a, du_xhat_b, BLOCK_PAIRS)
    _add_pairs(grad_mix_ptr, pair0, width, mix_a, mix_b, BLOCK_PAIRS)


@triton.jit
def _cat_backward_input_kernel(z_ptr, g_ptr, scale_ptr, shift_ptr, mix_ptr, mean_ptr, invstd_ptr,
                               mean_du_ptr, mean_du_xhat_ptr, grad_z_ptr, num_pixels, width, out_offset,
                               BATCH_STATS: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    pixels = tl.program_id(0) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    pair0 = tl.program_id(1) * BLOCK_PAIRS
    ok, za, zb, ua, ub = _pre_activations(z_ptr, scale_ptr, shift_ptr, pixels, num_pixels, pair0, width,
                                          BLOCK_PIXELS, BLOCK_PAIRS)
    _, dua, dub = _bn_input_grads(g_ptr, mix_ptr, pixels, pair0, ok, ua, ub, width, out_offset, BLOCK_PAIRS)
    scale_a, scale_b = _vector_pairs(scale_ptr, pair0, width, BLOCK_PAIRS)
    if BATCH_STATS:  # the batch mean and variance depend on z too
        mean_a, mean_b = _vector_pairs(mean_ptr, pair0, width, BLOCK_PAIRS)
        invstd_a, invstd_b = _vector_pairs(invstd_ptr, pair0, width, BLOCK_PAIRS)
        mean_du_a, mean_du_b = _vector_pairs(mean_du_ptr, pair0, width, BLOCK_PAIRS)
        mean_du_xhat_a, mean_du_xhat_b = _vector_pairs(mean_du_xhat_ptr, pair0, width, BLOCK_PAIRS)
        dua -= mean_du_a[None, :] + (za - mean_a[None, :]) * (invstd_a * mean_du_xhat_a)[None, :]
        dub -= mean_du_b[None, :] + (zb - mean_b[None, :]) * (invstd_b * mean_du_xhat_b)[None, :]
    grad = tl.reshape(tl.join(scale_a[None, :] * dua, scale_b[None, :] * dub), (BLOCK_PIXELS, 2 * BLOCK_PAIRS))
    channels = 2 * pair0 + tl.arange(0, 2 * BLOCK_PAIRS)
    store_ok = (pixels < num_pixels)[:, None] & (channels < width)[None, :]
    target = grad_z_ptr + (pixels.to(tl.int64) * width)[:, None] + channels[None, :]
    tl.store(target, grad.to(grad_z_ptr.dtype.element_ty), mask=store_ok)  # one contiguous store


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
