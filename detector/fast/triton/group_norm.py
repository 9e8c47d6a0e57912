"""Triton kernels of the fused GroupNorm (+ ReLU) of :mod:`detector.fast.norm`.

A (N, C, H, W) tensor is walked as (N, HW, C) through its strides, so NCHW and channels_last
inputs both work without a copy (H and W must merge: ``stride_h == W * stride_w``). Every kernel
reads its input in its own dtype and computes in float32; outputs are written in the input's dtype.

Forward, three launches:

1. ``_stats_kernel`` -- program (n, tile): a tile of ``BLOCK_HW`` rows x all channels; per
   channel the tile's sum and its centred sum of squares (M2) -> partials (N, T, C) float32;
2. ``_finalize_kernel`` -- program (n, group): Chan's parallel combination of the partials of the
   group's channels -> mean, rstd (N, G) and the per-(n, c) affine coefficients
   ``a = gamma * rstd``, ``b = beta - mean * a``;
3. ``_apply_kernel`` -- program (n, tile): ``y = x * a + b`` (then ReLU) -> y.

Backward, three launches (ReLU: ``dy = dz * (z > 0)`` from the saved output z):

1. ``_backward_stats_kernel`` -- per tile and channel ``sum(dy)`` and ``sum(dy * (x - mean))``;
2. ``_backward_finalize_kernel`` -- program (n, group): sums over tiles, then the coefficients of
   ``dx = P * dy + Q * (x - mean) + R`` with ``P = rstd * gamma``,
   ``Q = -rstd^2 * mean_group(dxhat * xhat)``, ``R = -rstd * mean_group(dxhat)``;
   also the per-image parameter gradients ``dgamma_n = rstd * sum(dy * (x - mean))``,
   ``dbeta_n = sum(dy)`` (summed over images on the host);
3. ``_backward_apply_kernel`` -- dx.

Runs on CUDA; with ``TRITON_INTERPRET=1`` set before import, Triton's interpreter runs the same
kernels on CPU tensors (tests/fast/test_fast_paths.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE_ELEMENTS = 8192  # rows x channels of one tile (32 rows of 256 channels)
FINALIZE_TILES = 64  # tiles summed per step of the finalize loops


@triton.jit
def _stats_kernel(x_ptr, sum_ptr, m2_ptr, HW, C, num_tiles, sx_n, sx_hw, sx_c,
                  BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows < HW)[:, None] & (cols < C)[None, :]
    offs = n.to(tl.int64) * sx_n + rows[:, None].to(tl.int64) * sx_hw + cols[None, :].to(tl.int64) * sx_c
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_HW, BLOCK_C)
    count = tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW).to(tl.float32)
    total = tl.sum(x, axis=0)  # (BLOCK_C,)
    centred = tl.where(ok, x - (total / count)[None, :], 0.0)
    m2 = tl.sum(centred * centred, axis=0)
    out = (n * num_tiles + tile).to(tl.int64) * C + cols
    tl.store(sum_ptr + out, total, mask=cols < C)
    tl.store(m2_ptr + out, m2, mask=cols < C)


@triton.jit
def _finalize_kernel(sum_ptr, m2_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, a_ptr, b_ptr,
                     HW, C, G, num_tiles, eps,
                     GROUP_CHANNELS: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_HW: tl.constexpr):
    n = tl.program_id(0)
    g = tl.program_id(1)
    cg = tl.arange(0, BLOCK_CG)
    channel = g * GROUP_CHANNELS + cg
    channel_ok = cg < GROUP_CHANNELS
    group_size = (HW * GROUP_CHANNELS).to(tl.float32)
    base = n.to(tl.int64) * num_tiles * C
    total = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    for start in range(0, num_tiles, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        ok = (tiles < num_tiles)[:, None] & channel_ok[None, :]
        offs = base + tiles[:, None].to(tl.int64) * C + channel[None, :]
        total += tl.load(sum_ptr + offs, mask=ok, other=0.0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / group_size
    m2 = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    for start in range(0, num_tiles, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        ok = (tiles < num_tiles)[:, None] & channel_ok[None, :]
        offs = base + tiles[:, None].to(tl.int64) * C + channel[None, :]
        count = tl.minimum(HW - tiles * BLOCK_HW, BLOCK_HW).to(tl.float32)[:, None]  # (BLOCK_T, 1)
        tile_sum = tl.load(sum_ptr + offs, mask=ok, other=0.0)
        tile_m2 = tl.load(m2_ptr + offs, mask=ok, other=0.0)
        spread = tl.where(ok, tile_sum / tl.maximum(count, 1.0) - mean, 0.0)
        m2 += tile_m2 + count * spread * spread
    variance = tl.sum(tl.sum(m2, axis=1), axis=0) / group_size
    rstd = 1.0 / tl.sqrt(variance + eps)
    tl.store(mean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, rstd)
    gamma = tl.load(gamma_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)
    scale = gamma * rstd
    tl.store(a_ptr + n * C + channel, scale, mask=channel_ok)
    tl.store(b_ptr + n * C + channel, beta - mean * scale, mask=channel_ok)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, a_ptr, b_ptr, HW, C, sx_n, sx_hw, sx_c, sy_n, sy_hw, sy_c,
                  RELU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < HW)[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    cols64 = cols[None, :].to(tl.int64)
    x = tl.load(x_ptr + n.to(tl.int64) * sx_n + rows64 * sx_hw + cols64 * sx_c, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + n * C + cols, mask=col_ok, other=0.0)
    b = tl.load(b_ptr + n * C + cols, mask=col_ok, other=0.0)
    y = x * a[None, :] + b[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + n.to(tl.int64) * sy_n + rows64 * sy_hw + cols64 * sy_c, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_dy(dz_ptr, z_ptr, n, rows64, cols64, ok, sd_n, sd_hw, sd_c, sz_n, sz_hw, sz_c, RELU: tl.constexpr):
    dy = tl.load(dz_ptr + n.to(tl.int64) * sd_n + rows64 * sd_hw + cols64 * sd_c, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        z = tl.load(z_ptr + n.to(tl.int64) * sz_n + rows64 * sz_hw + cols64 * sz_c, mask=ok, other=0.0)
        dy = tl.where(z > 0, dy, 0.0)
    return dy


@triton.jit
def _backward_stats_kernel(dz_ptr, z_ptr, x_ptr, mean_ptr, s1_ptr, s2_ptr, HW, C, G, num_tiles,
                           sd_n, sd_hw, sd_c, sz_n, sz_hw, sz_c, sx_n, sx_hw, sx_c,
                           GROUP_CHANNELS: tl.constexpr, RELU: tl.constexpr, BLOCK_HW: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < HW)[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    cols64 = cols[None, :].to(tl.int64)
    dy = _load_dy(dz_ptr, z_ptr, n, rows64, cols64, ok, sd_n, sd_hw, sd_c, sz_n, sz_hw, sz_c, RELU)
    x = tl.load(x_ptr + n.to(tl.int64) * sx_n + rows64 * sx_hw + cols64 * sx_c, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + n * G + cols // GROUP_CHANNELS, mask=col_ok, other=0.0)
    centred = tl.where(ok, x - mean[None, :], 0.0)
    out = (n * num_tiles + tile).to(tl.int64) * C + cols
    tl.store(s1_ptr + out, tl.sum(dy, axis=0), mask=col_ok)
    tl.store(s2_ptr + out, tl.sum(dy * centred, axis=0), mask=col_ok)


@triton.jit
def _backward_finalize_kernel(s1_ptr, s2_ptr, gamma_ptr, mean_ptr, rstd_ptr, p_ptr, q_ptr, r_ptr, m_ptr,
                              dgamma_ptr, dbeta_ptr, HW, C, G, num_tiles,
                              GROUP_CHANNELS: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_T: tl.constexpr):
    n = tl.program_id(0)
    g = tl.program_id(1)
    cg = tl.arange(0, BLOCK_CG)
    channel = g * GROUP_CHANNELS + cg
    channel_ok = cg < GROUP_CHANNELS
    base = n.to(tl.int64) * num_tiles * C
    s1 = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    for start in range(0, num_tiles, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        ok = (tiles < num_tiles)[:, None] & channel_ok[None, :]
        offs = base + tiles[:, None].to(tl.int64) * C + channel[None, :]
        s1 += tl.load(s1_ptr + offs, mask=ok, other=0.0)
        s2 += tl.load(s2_ptr + offs, mask=ok, other=0.0)
    sum_dy = tl.sum(s1, axis=0)  # (BLOCK_CG,)
    sum_dy_centred = tl.sum(s2, axis=0)
    mean = tl.load(mean_ptr + n * G + g)
    rstd = tl.load(rstd_ptr + n * G + g)
    gamma = tl.load(gamma_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)
    group_size = (HW * GROUP_CHANNELS).to(tl.float32)
    mean_dxhat = tl.sum(gamma * sum_dy, axis=0) / group_size
    mean_dxhat_xhat = tl.sum(gamma * sum_dy_centred, axis=0) * rstd / group_size
    zero = gamma * 0.0
    tl.store(p_ptr + n * C + channel, rstd * gamma, mask=channel_ok)
    tl.store(q_ptr + n * C + channel, zero - rstd * rstd * mean_dxhat_xhat, mask=channel_ok)
    tl.store(r_ptr + n * C + channel, zero - rstd * mean_dxhat, mask=channel_ok)
    tl.store(m_ptr + n * C + channel, zero + mean, mask=channel_ok)
    tl.store(dgamma_ptr + n * C + channel, sum_dy_centred * rstd, mask=channel_ok)
    tl.store(dbeta_ptr + n * C + channel, sum_dy, mask=channel_ok)


@triton.jit
def _backward_apply_kernel(dz_ptr, z_ptr, x_ptr, dx_ptr, p_ptr, q_ptr, r_ptr, m_ptr, HW, C,
                           sd_n, sd_hw, sd_c, sz_n, sz_hw, sz_c, sx_n, sx_hw, sx_c, so_n, so_hw, so_c,
                           RELU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < HW)[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    cols64 = cols[None, :].to(tl.int64)
    dy = _load_dy(dz_ptr, z_ptr, n, rows64, cols64, ok, sd_n, sd_hw, sd_c, sz_n, sz_hw, sz_c, RELU)
    x = tl.load(x_ptr + n.to(tl.int64) * sx_n + rows64 * sx_hw + cols64 * sx_c, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + n * C + cols, mask=col_ok, other=0.0)[None, :]
    q = tl.load(q_ptr + n * C + cols, mask=col_ok, other=0.0)[None, :]
    r = tl.load(r_ptr + n * C + cols, mask=col_ok, other=0.0)[None, :]
    m = tl.load(m_ptr + n * C + cols, mask=col_ok, other=0.0)[None, :]
    dx = p * dy + q * (x - m) + r
    tl.store(dx_ptr + n.to(tl.int64) * so_n + rows64 * so_hw + cols64 * so_c, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _layout(t: Tensor) -> tuple[int, int, int]:
    """Strides (n, hw, c) of a (N, C, H, W) tensor whose H and W merge into one axis."""
    n_stride, c_stride, h_stride, w_stride = t.stride()
    if t.shape[3] > 1 and t.shape[2] > 1 and h_stride != t.shape[3] * w_stride:
        raise ValueError("gn_triton: H and W of the tensor do not merge; pass a contiguous or channels_last tensor")
    return n_stride, w_stride if t.shape[3] > 1 else h_stride, c_stride


def mergeable(t: Tensor) -> bool:
    """Whether the kernels can walk ``t`` (N, C, H, W) without a copy."""
    try:
        _layout(t)
    except ValueError:
        return False
    return True


def _blocks(channels: int, hw: int, groups: int) -> tuple[int, int, int, int]:
    block_c = triton.next_power_of_2(channels)
    block_hw = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(hw)))
    num_tiles = triton.cdiv(hw, block_hw)
    block_cg = triton.next_power_of_2(channels // groups)
    return block_c, block_hw, num_tiles, block_cg


def group_norm_forward(x: Tensor, gamma: Tensor, beta: Tensor, groups: int, eps: float,
                       relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean (N, G), rstd (N, G)) for x (N, C, H, W); y has x's dtype and memory layout."""
    n, channels, height, width = x.shape
    hw = height * width
    block_c, block_hw, num_tiles, block_cg = _blocks(channels, hw, groups)
    f32 = dict(device=x.device, dtype=torch.float32)
    sums = torch.empty(n, num_tiles, channels, **f32)
    m2 = torch.empty(n, num_tiles, channels, **f32)
    mean, rstd = torch.empty(n, groups, **f32), torch.empty(n, groups, **f32)
    scale, shift = torch.empty(n, channels, **f32), torch.empty(n, channels, **f32)
    y = torch.empty_like(x)
    sx, sy = _layout(x), _layout(y)
    _stats_kernel[(n, num_tiles)](x, sums, m2, hw, channels, num_tiles, *sx,
                                  BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8)
    _finalize_kernel[(n, groups)](sums, m2, gamma, beta, mean, rstd, scale, shift, hw, channels, groups,
                                  num_tiles, eps, GROUP_CHANNELS=channels // groups, BLOCK_CG=block_cg,
                                  BLOCK_T=FINALIZE_TILES, BLOCK_HW=block_hw, num_warps=2)
    _apply_kernel[(n, num_tiles)](x, y, scale, shift, hw, channels, *sx, *sy, RELU=relu,
                                  BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8)
    return y, mean, rstd


def group_norm_backward(grad_out: Tensor, out: Tensor | None, x: Tensor, mean: Tensor, rstd: Tensor,
                        gamma: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta); ``out`` is the saved ReLU output (None without ReLU)."""
    n, channels, height, width = x.shape
    hw = height * width
    block_c, block_hw, num_tiles, block_cg = _blocks(channels, hw, groups)
    relu = out is not None
    f32 = dict(device=x.device, dtype=torch.float32)
    s1 = torch.empty(n, num_tiles, channels, **f32)
    s2 = torch.empty(n, num_tiles, channels, **f32)
    coefficients = [torch.empty(n, channels, **f32) for _ in range(4)]  # P, Q, R, M
    dgamma_n, dbeta_n = torch.empty(n, channels, **f32), torch.empty(n, channels, **f32)
    dx = torch.empty_like(x)
    sd, sx, so = _layout(grad_out), _layout(x), _layout(dx)
    sz = _layout(out) if relu else sd
    z = out if relu else grad_out
    _backward_stats_kernel[(n, num_tiles)](grad_out, z, x, mean, s1, s2, hw, channels, groups, num_tiles,
                                           *sd, *sz, *sx, GROUP_CHANNELS=channels // groups, RELU=relu,
                                           BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8)
    _backward_finalize_kernel[(n, groups)](s1, s2, gamma, mean, rstd, *coefficients, dgamma_n, dbeta_n, hw,
                                           channels, groups, num_tiles, GROUP_CHANNELS=channels // groups,
                                           BLOCK_CG=block_cg, BLOCK_T=FINALIZE_TILES, num_warps=2)
    _backward_apply_kernel[(n, num_tiles)](grad_out, z, x, dx, *coefficients, hw, channels, *sd, *sz, *sx, *so,
                                           RELU=relu, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8)
    return dx, dgamma_n.sum(0).to(gamma.dtype), dbeta_n.sum(0).to(gamma.dtype)
