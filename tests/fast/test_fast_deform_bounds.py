"""The DCN Triton kernels stay inside their tensors at the sampling points that stress the masks (issue #21).

Under Triton's CPU interpreter (subprocess), :mod:`detector.fast.triton.deform`'s forward and
backward run on tensors that are views into larger buffers whose margins hold canaries (NaN before
and after the input, a sentinel around every output): offsets far outside the image, +-inf, NaN,
points just inside and just outside each border, the split layout in float32 and the packed one in
bfloat16 (its input gradient accumulated in float32: the interpreter has no bfloat16 atomics), a
channel block partly masked. A read past a tensor's ends would pull a NaN into a finite result; a
write or atomic past them would change a sentinel. Index bounds at the bench shapes (all in int64 where
they can pass 2^31) are in experiments/PERF.md ("Issue #21").
"""
from __future__ import annotations

import pytest

SCRIPT = r"""
import math, torch
from detector.fast.triton import deform as kernels
from detector.fast.deform_sampler import DeformGeometry

SENTINEL = 12345.0
MARGIN = 64  # elements of canary on each side of every tensor

def inside(shape, dtype, fill):
    # a contiguous tensor of `shape` in the middle of a buffer whose margins hold `fill`
    count = math.prod(shape)
    buffer = torch.full((count + 2 * MARGIN,), fill, dtype=dtype)
    return buffer, buffer[MARGIN:MARGIN + count].view(shape)

def margins_hold(buffer, fill):
    edge = torch.cat([buffer[:MARGIN], buffer[-MARGIN:]])
    return bool((edge.isnan().all() if math.isnan(fill) else (edge == fill).all()))

n, height, width, channels, groups, kernel = 2, 4, 5, 48, 2, 3  # 24 channels per group: a block of 32, 8 masked
geo = DeformGeometry(height, width, height, width, kernel, kernel, (1, 1), (1, 1), (1, 1), groups, 1)
taps, pixels = geo.taps, geo.out_pixels
gen = torch.Generator().manual_seed(0)
special = torch.tensor([0.0, 0.5, -0.999, -1.0, -1.001, height - 1.0, height - 1.001, height - 0.999, width - 1.0,
                        width + 0.5, 1e6, -1e6, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")])
for packed, dtype in ((False, torch.float32), (True, torch.bfloat16)):
    x_buf, x = inside((n, height, width, channels), dtype, float("nan"))
    x.copy_(torch.randn(x.shape, generator=gen))
    rows = (3 if packed else 2) * groups * taps
    off_buf, offset = inside((n, rows, height, width), torch.float32, float("nan"))
    pick = torch.randint(0, len(special), (n, 2 * groups * taps, height, width), generator=gen)
    offset[:, :2 * groups * taps] = special[pick]
    mask = None
    if packed:
        offset[:, 2 * groups * taps:] = torch.randn(n, groups * taps, height, width, generator=gen)
    else:
        mask_buf, mask = inside((n, groups * taps, height, width), torch.float32, float("nan"))
        mask.copy_(torch.rand(mask.shape, generator=gen))
    finite_rows = torch.isfinite(offset[:, :2 * groups * taps]).all(1).reshape(-1)  # (n*L,) all taps finite
    # forward
    columns = kernels.sample_columns(x, offset, mask, geo, packed=packed)
    assert torch.isfinite(columns.float()).all(), (packed, dtype, "a column read a canary")
    # backward, every output written into sentinel-framed buffers
    # float32 accumulator: the interpreter has no bf16 atomics (the bf16 one runs on the GPU only)
    gx_buf, grad_x = inside(x.shape, torch.float32, SENTINEL)
    grad_x.zero_()
    go_buf, grad_offset = inside(offset.shape, torch.float32, SENTINEL)
    gm_buf, grad_mask = (None, None) if packed else inside(mask.shape, torch.float32, SENTINEL)
    grad_columns = torch.randn(columns.shape, generator=gen).to(dtype)
    kernels.sample_columns_backward(grad_columns, x, offset, mask, geo, grad_x, grad_offset, grad_mask,
                                    packed=packed)
    for buffer, fill, name in ((gx_buf, SENTINEL, "grad_x"), (go_buf, SENTINEL, "grad_offset"),
                               (gm_buf, SENTINEL, "grad_mask"), (x_buf, float("nan"), "x"),
                               (off_buf, float("nan"), "offset")):
        if buffer is not None:
            assert margins_hold(buffer, fill), (packed, dtype, name, "written past its ends")
    assert torch.isfinite(grad_x.float()).all(), (packed, dtype, "grad_x read or scattered a canary")
    per_row = grad_offset[:, :2 * groups * taps].permute(0, 2, 3, 1).reshape(n * pixels, -1)
    assert torch.isfinite(per_row[finite_rows]).all(), (packed, dtype, "finite points got a non-finite gradient")
    assert (grad_offset != SENTINEL).all(), (packed, dtype, "an offset gradient was not written")
print("bounds ok")
"""


def test_dcn_kernels_stay_inside_their_tensors_at_extreme_and_border_sampling_points():
    pytest.importorskip("triton")
    from triton_interpreter import run_under_interpreter

    result = run_under_interpreter(SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bounds ok" in result.stdout
