"""Benchmark the fast deformable convolution against torchvision.ops.deform_conv2d.

One DCN layer as the search space uses it (DESIGN sections 4 and 10): offsets and masks from a
3x3 conv (2*G*9 + G*9 channels), modulated deformable 3x3 conv C -> C with bias, forward +
backward. Default shape: batch 16, 256 channels, 100x152, 2 offset groups. Every row is timed in
the same run (warm-up excluded, median of repeats, CUDA events on GPU) with its peak extra memory;
"ratio" is the row's time over torchvision fp32.

    python experiments/bench_dcn.py --device cuda --check --breakdown --sweep
    python experiments/bench_dcn.py --device cpu --quick

Imports only torch, torchvision and detector.fast.deform (the GPU machine has nothing else).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from detector.fast import deform as fast_deform  # noqa: E402
from detector.fast import deform_sampler  # noqa: E402

KERNEL = 3


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    height: int
    width: int
    offset_groups: int


class BenchError(ValueError):
    """Bad command-line input."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``step`` over ``repeats`` after ``warmup`` calls, and peak extra MiB."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1000)
        peak = float("nan")
    return statistics.median(times), peak


def make_layer(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Input, offset-predictor and DCN parameters (leaves), and the output gradient."""
    gen = torch.Generator().manual_seed(seed)
    c, g = shape.channels, shape.offset_groups
    taps = KERNEL * KERNEL

    def leaf(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    # Offset predictor weights sized so that offsets are ~N(0, 1) pixels (a trained DCN, not the
    # zero-initialised one: sampling positions then are not all integers).
    return {
        "x": leaf(shape.batch, c, shape.height, shape.width, scale=1.0),
        "offset_weight": leaf(3 * g * taps, c, KERNEL, KERNEL, scale=(c * taps) ** -0.5),
        "offset_bias": leaf(3 * g * taps, scale=0.1),
        "weight": leaf(c, c, KERNEL, KERNEL, scale=(c * taps) ** -0.5),
        "bias": leaf(c, scale=0.1),
        "grad": torch.randn(shape.batch, c, shape.height, shape.width, generator=gen).to(device, dtype),
    }


def dcn_step(impl: Callable[..., torch.Tensor], layer: dict[str, torch.Tensor], offset_groups: int) -> Callable[[], None]:
    split = 2 * offset_groups * KERNEL * KERNEL

    def step() -> None:
        for t in layer.values():
            t.grad = None
        offset_mask = F.conv2d(layer["x"], layer["offset_weight"], layer["offset_bias"], padding=1)
        offset, mask = offset_mask[:, :split], offset_mask[:, split:].sigmoid()
        out = impl(layer["x"], offset, layer["weight"], layer["bias"], padding=1, mask=mask)
        out.backward(layer["grad"])

    return step


def conv_step(layer: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in layer.values():
            t.grad = None
        F.conv2d(layer["x"], layer["weight"], layer["bias"], padding=1).backward(layer["grad"])

    return step


def columns_impl(backend: str, budget: int = fast_deform.COLUMN_BUDGET_BYTES) -> Callable[..., torch.Tensor]:
    def impl(*args, **kwargs):
        return fast_deform.deform_conv2d_columns(*args, **kwargs, backend=backend, column_budget_bytes=budget)

    return impl


def benchmark_table(args: argparse.Namespace, shape: Shape, device: torch.device, started: float) -> None:
    cuda = device.type == "cuda"
    fast_backend = "triton" if cuda and deform_sampler.triton_sampler() is not None else "torch"
    rows: list[tuple[str, torch.dtype, Callable]] = [
        ("torchvision", torch.float32, lambda layer: dcn_step(torchvision.ops.deform_conv2d, layer, shape.offset_groups)),
    ]
    if cuda:
        rows.append(("torchvision", torch.float16,
                     lambda layer: dcn_step(torchvision.ops.deform_conv2d, layer, shape.offset_groups)))
    for dtype in ((torch.float32, torch.float16, torch.bfloat16) if cuda else (torch.float32, torch.bfloat16)):
        rows.append((f"fast[{fast_backend}]", dtype,
                     lambda layer: dcn_step(columns_impl(fast_backend), layer, shape.offset_groups)))
    if cuda:
        rows.append(("fast[triton] 1 chunk", torch.bfloat16,
                     lambda layer: dcn_step(columns_impl("triton", 1 << 40), layer, shape.offset_groups)))
        rows.append(("fast[triton] tf32 matmul", torch.float32, "tf32"))
        if not args.quick:
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(("fast[torch]", dtype, lambda layer: dcn_step(columns_impl("torch"), layer, shape.offset_groups)))
    rows += [("conv3x3", torch.float32, conv_step), ("conv3x3", torch.bfloat16, conv_step)]
    if args.compile:
        rows.append(("fast[torch]+compile", torch.bfloat16, "compile"))

    print(f"\nDCN layer forward+backward, batch {shape.batch}, {shape.channels}->{shape.channels}, "
          f"{shape.height}x{shape.width}, {shape.offset_groups} offset groups, 3x3 offset conv included; "
          f"median of {args.repeats} after {args.warmup} warm-up, device {device_name(device)}")
    print(f"{'implementation':<28}{'dtype':<10}{'ms':>10}{'ratio':>9}{'peak MiB':>11}")
    reference = None
    for name, dtype, build in rows:
        if time.time() - started > args.time_limit:
            print(f"{name:<28}{str(dtype)[6:]:<10}  skipped: past --time-limit {args.time_limit}s")
            continue
        layer = make_layer(shape, dtype, device)
        tf32_before = torch.backends.cuda.matmul.allow_tf32
        try:
            if build == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = True
                step = dcn_step(columns_impl("triton"), layer, shape.offset_groups)
            elif build == "compile":
                step = dcn_step(torch.compile(columns_impl("torch")), layer, shape.offset_groups)
            else:
                step = build(layer)
            ms, peak = time_step(step, device, args.warmup, args.repeats)
        except Exception as err:  # report the row and go on: one failing variant must not hide the others
            print(f"{name:<28}{str(dtype)[6:]:<10}  failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
            del layer
            if cuda:
                torch.cuda.empty_cache()
        reference = ms if reference is None else reference
        print(f"{name:<28}{str(dtype)[6:]:<10}{ms:>10.2f}{reference / ms:>8.2f}x{peak:>11.0f}", flush=True)


VARIANTS = {  # name -> DeformOptions fields (keep_columns, low_precision_input_grad, packed)
    "recompute columns, fp32 input grad": (False, False, False),
    "keep columns": (True, False, False),
    "bf16 input grad": (False, True, False),
    "keep columns + bf16 input grad": (True, True, False),
    "keep + bf16 + packed (default)": (True, True, True),
}


def variants(shape: Shape, device: torch.device, args: argparse.Namespace) -> None:
    """Full bf16 layer (triton) for each DeformOptions combination: time, peak memory and the worst
    relative gradient error against torchvision in float64 on the same inputs."""
    # torchvision in fp64 on the full batch is slow: the error is checked on 2 images
    small = Shape(min(2, shape.batch), shape.channels, shape.height, shape.width, shape.offset_groups)
    layer64 = make_layer(small, torch.float64, device)
    reference = _layer_grads(torchvision.ops.deform_conv2d, layer64, shape.offset_groups)
    print(f"\nFast-path variants (bf16, triton): DCN layer forward+backward, median of {args.repeats}; "
          "error = worst relative gradient error vs torchvision fp64 (2 images)")
    print(f"{'variant':<36}{'ms':>8}{'peak MiB':>10}{'error':>10}")
    default = fast_deform.DEFAULT_OPTIONS
    try:
        for name, fields in VARIANTS.items():
            fast_deform.DEFAULT_OPTIONS = fast_deform.DeformOptions(*fields)
            try:
                layer = make_layer(shape, torch.bfloat16, device)
                ms, peak = time_step(dcn_step(columns_impl("triton"), layer, shape.offset_groups), device,
                                     args.warmup, args.repeats)
                del layer
                low = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in layer64.items()}
                grads = _layer_grads(columns_impl("triton"), low, shape.offset_groups)
                error = max(relative_error(g.double(), r) for g, r in zip(grads, reference))
            except Exception as err:
                print(f"{name:<36}  failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            print(f"{name:<36}{ms:>8.2f}{peak:>10.0f}{error:>10.2e}", flush=True)
    finally:
        fast_deform.DEFAULT_OPTIONS = default


def _layer_grads(impl, layer: dict[str, torch.Tensor], offset_groups: int) -> list[torch.Tensor]:
    """Gradients of the input and the DCN/offset-predictor parameters for layer['grad']."""
    split = 2 * offset_groups * KERNEL * KERNEL
    offset_mask = F.conv2d(layer["x"], layer["offset_weight"], layer["offset_bias"], padding=1)
    offset, mask = offset_mask[:, :split], offset_mask[:, split:].sigmoid()
    out = impl(layer["x"], offset, layer["weight"], layer["bias"], padding=1, mask=mask)
    leaves = [layer[k] for k in ("x", "offset_weight", "weight", "bias")]
    return [out.detach(), *torch.autograd.grad(out, leaves, layer["grad"].to(out.dtype))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare(impl, shape: Shape, dtype: torch.dtype, device: torch.device, stride=1, dilation=1, zero_offsets=False,
            reference_dtype: torch.dtype | None = None, seed: int = 1) -> float:
    """Worst relative error (output and every gradient) of impl in dtype vs torchvision in reference_dtype."""
    gen = torch.Generator().manual_seed(seed)
    c, g, taps = shape.channels, shape.offset_groups, KERNEL * KERNEL
    pad = dilation
    out_h = (shape.height + 2 * pad - dilation * (KERNEL - 1) - 1) // stride + 1
    out_w = (shape.width + 2 * pad - dilation * (KERNEL - 1) - 1) // stride + 1
    base = {
        "x": torch.randn(shape.batch, c, shape.height, shape.width, generator=gen),
        "offset": torch.zeros(shape.batch, 2 * g * taps, out_h, out_w) if zero_offsets
        else torch.randn(shape.batch, 2 * g * taps, out_h, out_w, generator=gen) * 3,
        "weight": torch.randn(c, c, KERNEL, KERNEL, generator=gen) * (c * taps) ** -0.5,
        "bias": torch.randn(c, generator=gen),
        "mask": torch.rand(shape.batch, g * taps, out_h, out_w, generator=gen),
    }
    grad = torch.randn(shape.batch, c, out_h, out_w, generator=gen).to(device)
    results = []
    for fn, dt in ((impl, dtype), (torchvision.ops.deform_conv2d, reference_dtype or dtype)):
        # offsets and masks stay float32 for a 16-bit impl (as detector.model.deform computes them), so the
        # error measured is the kernel's, not that of 16-bit sampling positions
        coord_dt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        t = {k: v.to(device, coord_dt if k in ("offset", "mask") else dt).requires_grad_() for k, v in base.items()}
        out = fn(t["x"], t["offset"], t["weight"], t["bias"], stride=stride, padding=pad, dilation=dilation, mask=t["mask"])
        grads = torch.autograd.grad(out, list(t.values()), grad.to(out.dtype))
        results.append([out, *grads])
    return max(relative_error(a, b) for a, b in zip(*results))


def correctness_check(device: torch.device) -> bool:
    """Fast vs torchvision on this device: float64 (tight), float32, bfloat16 vs float64."""
    print(f"\nCorrectness vs torchvision on {device_name(device)} (max relative error over output and 5 grads)")
    impl = fast_deform.deform_conv2d_fast
    ok = True
    cases = [
        ("fp64 2x8x9x11 G=2", Shape(2, 8, 9, 11, 2), torch.float64, {}, 1e-10),
        ("fp64 stride 2 dil 2 G=1", Shape(2, 6, 12, 10, 1), torch.float64, dict(stride=2, dilation=2), 1e-10),
        ("fp64 zero offsets", Shape(2, 8, 7, 9, 2), torch.float64, dict(zero_offsets=True), 1e-10),
        ("fp64 256ch 25x38 G=2", Shape(2, 256, 25, 38, 2), torch.float64, {}, 1e-10),
        ("fp32 256ch 50x76 G=2", Shape(2, 256, 50, 76, 2), torch.float32, {}, 1e-4),
        ("bf16 vs fp64 256ch 50x76", Shape(2, 256, 50, 76, 2), torch.bfloat16, dict(reference_dtype=torch.float64), 3e-2),
        ("fp16 vs fp64 256ch 50x76", Shape(2, 256, 50, 76, 2), torch.float16, dict(reference_dtype=torch.float64), 5e-3),
    ]
    for name, shape, dtype, kwargs, tol in cases:
        try:
            err = compare(impl, shape, dtype, device, **kwargs)
        except Exception as exc:
            print(f"  {name:<28} FAILED to run: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            ok = False
            continue
        passed = err <= tol
        ok &= passed
        print(f"  {name:<28} {err:.2e}  (tol {tol:.0e})  {'PASS' if passed else 'FAIL'}", flush=True)
    return ok


def breakdown(shape: Shape, device: torch.device, args: argparse.Namespace) -> None:
    """Time the pieces of one bf16 fast call with the triton sampler (one chunk)."""
    from detector.fast.triton import deform as fdt

    dtype = torch.bfloat16
    layer = make_layer(shape, dtype, device)
    x = layer["x"].detach()
    split = 2 * shape.offset_groups * KERNEL * KERNEL
    with torch.no_grad():
        offset_mask = F.conv2d(x, layer["offset_weight"], layer["offset_bias"], padding=1).float()
    offset, mask = offset_mask[:, :split].contiguous(), offset_mask[:, split:].sigmoid().contiguous()
    geo = deform_sampler.describe_deform_conv(x, offset, layer["weight"], None, mask, 1, 1, 1)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    weight_cols = fast_deform._weight_columns(layer["weight"].detach(), geo)  # (1, Cout, K*C)
    columns = fdt.sample_columns(x_nhwc, offset, mask, geo)
    out_rows = x.new_empty(shape.batch * geo.out_pixels, shape.channels)  # (N*L, Cout), NHWC
    grad_x = torch.zeros(x_nhwc.shape, device=device)
    grad_offset, grad_mask = torch.empty_like(offset), torch.empty_like(mask)
    grad_x16 = torch.zeros(x_nhwc.shape, device=device, dtype=dtype)
    grad_rows = layer["grad"].permute(0, 2, 3, 1).reshape(-1, shape.channels).contiguous()
    pieces = {
        "NCHW -> NHWC input copy": lambda: x.permute(0, 2, 3, 1).contiguous(),
        "sample columns (triton)": lambda: fdt.sample_columns(x_nhwc, offset, mask, geo),
        "GEMM out = cols W^T": lambda: fast_deform._columns_times_weight(columns, weight_cols, None, out_rows),
        "GEMM grad_cols = g W": lambda: fast_deform._grad_columns(grad_rows, weight_cols, geo.taps),
        "GEMM grad_W = g^T cols": lambda: fast_deform._accumulate_grad_weight(grad_rows, columns, None, torch.float32),
        "sample backward (triton)": lambda: fdt.sample_columns_backward(
            columns, x_nhwc, offset, mask, geo, grad_x, grad_offset, grad_mask),
        "grad_x NHWC fp32 -> NCHW": lambda: x.new_empty(x.shape).copy_(grad_x.permute(0, 3, 1, 2)),
        "sample backward, bf16 grad_x": lambda: fdt.sample_columns_backward(
            columns, x_nhwc, offset, mask, geo, grad_x16, grad_offset, grad_mask),
    }
    rows2d = columns.view(columns.shape[0], -1)
    gemm_flop = 2 * rows2d.shape[0] * rows2d.shape[1] * shape.channels
    column_bytes = columns.numel() * columns.element_size()
    print(f"\nBreakdown, bf16, one chunk of {shape.batch} images (columns {column_bytes / 2**30:.2f} GiB, "
          f"{gemm_flop / 1e9:.0f} GFLOP per GEMM)")
    for name, fn in pieces.items():
        ms, _ = time_step(fn, device, args.warmup, args.repeats)
        extra = (f"{gemm_flop / ms / 1e9:8.0f} TFLOP/s" if "GEMM" in name
                 else f"{column_bytes / ms / 1e6:8.0f} GB/s of columns" if "sample" in name else "")
        print(f"  {name:<28}{ms:>8.2f} ms {extra}", flush=True)


def sweep(shape: Shape, device: torch.device, args: argparse.Namespace) -> None:
    """Time the two triton kernels (bf16) for a few (rows, channels, warps) configs; keep the fastest."""
    from detector.fast.triton import deform as fdt

    layer = make_layer(shape, torch.bfloat16, device)
    x = layer["x"].detach()
    split = 2 * shape.offset_groups * KERNEL * KERNEL
    with torch.no_grad():
        offset_mask = F.conv2d(x, layer["offset_weight"], layer["offset_bias"], padding=1).float()
    offset, mask = offset_mask[:, :split].contiguous(), offset_mask[:, split:].sigmoid().contiguous()
    geo = deform_sampler.describe_deform_conv(x, offset, layer["weight"], None, mask, 1, 1, 1)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    columns = fdt.sample_columns(x_nhwc, offset, mask, geo)
    grad_offset, grad_mask = torch.empty_like(offset), torch.empty_like(mask)
    grad_x16 = torch.zeros(x_nhwc.shape, device=device, dtype=torch.bfloat16)  # the default accumulator
    calls = {
        "forward": lambda: fdt.sample_columns(x_nhwc, offset, mask, geo),
        "backward": lambda: fdt.sample_columns_backward(columns, x_nhwc, offset, mask, geo, grad_x16, grad_offset,
                                                        grad_mask),
    }
    configs = [(16, 128, 2), (32, 128, 4), (64, 128, 8), (16, 64, 2), (32, 64, 4), (64, 64, 4), (64, 64, 8),
               (128, 64, 8)]
    print("\nTriton kernel sweep (bf16, one chunk): rows, channels, warps -> ms")
    for kernel, call in calls.items():
        default = fdt.KERNEL_CONFIGS[kernel]
        timings = {}
        for config in configs:
            if time.time() - args.started > args.time_limit / 2:
                break
            fdt.KERNEL_CONFIGS[kernel] = config
            try:
                timings[config] = time_step(call, device, 2, max(5, args.repeats // 2))[0]
            except Exception as err:
                print(f"  {kernel} {config}: failed: {type(err).__name__}: {str(err).splitlines()[0][:150]}")
        best = min(timings, key=timings.get) if timings else default
        fdt.KERNEL_CONFIGS[kernel] = best if args.apply_sweep else default
        listing = ", ".join(f"{c}: {ms:.2f}" for c, ms in sorted(timings.items(), key=lambda kv: kv[1]))
        print(f"  {kernel:<9} best {best} (default {default}); {listing}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, torchvision {torchvision.__version__}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small shape, few repeats (smoke run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=100)
    parser.add_argument("--width", type=int, default=152)
    parser.add_argument("--offset-groups", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="correctness vs torchvision on the device first")
    parser.add_argument("--breakdown", action="store_true", help="time the pieces of the bf16 triton path")
    parser.add_argument("--sweep", action="store_true", help="time a few triton kernel configs")
    parser.add_argument("--variants", action="store_true", help="time the fast path's DeformOptions combinations")
    parser.add_argument("--apply-sweep", action="store_true", help="use the sweep's fastest configs in the table")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (torch sampler)")
    parser.add_argument("--time-limit", type=float, default=240.0, help="skip remaining rows after this many seconds")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise BenchError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here; use --device cpu")
    if min(args.batch, args.channels, args.height, args.width, args.offset_groups, args.repeats) < 1 or args.warmup < 0:
        raise BenchError("--batch/--channels/--height/--width/--offset-groups/--repeats must be >= 1, --warmup >= 0")
    if args.channels % args.offset_groups:
        raise BenchError(f"--channels {args.channels} must be divisible by --offset-groups {args.offset_groups}")
    if args.quick:
        args.batch, args.channels, args.height, args.width = 2, 32, 20, 30
        args.warmup, args.repeats = 1, 3
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as err:
        print(f"bench_dcn: {err}", file=sys.stderr)
        return 2
    args.started = time.time()
    device = torch.device(args.device)
    shape = Shape(args.batch, args.channels, args.height, args.width, args.offset_groups)
    ok = correctness_check(device) if args.check else True
    if device.type == "cuda" and deform_sampler.triton_sampler() is not None:
        if args.sweep:
            sweep(shape, device, args)
        if args.breakdown:
            breakdown(shape, device, args)
        if args.variants:
            variants(shape, device, args)
    benchmark_table(args, shape, device, args.started)
    print(f"\ntotal {time.time() - args.started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
