"""detector.fast.deform: equal to torchvision.ops.deform_conv2d, forward and backward.

float64 on CPU with tight tolerances over the argument space (strides, dilations, offset and
weight groups, mask/bias present or not, offsets far outside the image, zero offsets), gradcheck
on a tiny case, the chunking and dtype/autocast contracts, input validation, the impl selector;
the Triton kernels under Triton's CPU interpreter (subprocess) and, where CUDA exists, on the GPU.
"""
from __future__ import annotations


import pytest
import torch
import torchvision

from detector.fast import deform as fast_deform
from detector.fast import deform_sampler
from detector.fast.deform import DeformOptions, deform_conv2d_columns, deform_conv2d_fast, select_deform_conv2d


def make_case(batch=2, channels=4, out_channels=6, height=7, width=8, kernel=3, stride=1, padding=1, dilation=1,
              offset_groups=2, weight_groups=1, use_mask=True, use_bias=True, offset_scale=3.0, zero_offsets=False,
              dtype=torch.float64, device="cpu", seed=0):
    """Leaf tensors (input, offset, weight, bias, mask) and the conv keyword arguments."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.to(device, dtype).requires_grad_()

    out_h = (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = kernel * kernel
    offset = torch.randn(batch, 2 * offset_groups * taps, out_h, out_w, generator=gen) * offset_scale
    tensors = {
        "input": leaf(torch.randn(batch, channels, height, width, generator=gen)),
        "offset": leaf(offset * 0 if zero_offsets else offset),
        "weight": leaf(torch.randn(out_channels, channels // weight_groups, kernel, kernel, generator=gen)),
        "bias": leaf(torch.randn(out_channels, generator=gen)) if use_bias else None,
        "mask": leaf(torch.rand(batch, offset_groups * taps, out_h, out_w, generator=gen)) if use_mask else None,
    }
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


def run_with_grads(fn, tensors, conv_kwargs, grad_seed=1):
    out = fn(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], mask=tensors["mask"], **conv_kwargs)
    leaves = [t for t in tensors.values() if t is not None]
    # drawn in float64 then cast: the same gradient whatever the dtype under test
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grad_out = grad_out.to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def assert_matches_torchvision(fn, tensors, conv_kwargs, rtol=1e-10, atol=1e-10):
    names = ["output"] + [k for k, v in tensors.items() if v is not None]
    expected = run_with_grads(torchvision.ops.deform_conv2d, tensors, conv_kwargs)
    actual = run_with_grads(fn, tensors, conv_kwargs)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


CASES = {
    "default 3x3 G=2 mask bias": {},
    "stride 2 dilation 2 G=1 no mask no bias": dict(stride=2, dilation=2, padding=2, offset_groups=1,
                                                    use_mask=False, use_bias=False, height=11, width=9),
    "stride 2 padding 0": dict(stride=2, padding=0, height=9, width=10),
    "dilation 2 G=2": dict(dilation=2, padding=2, channels=6, offset_groups=2),
    "weight groups 2": dict(channels=4, out_channels=4, weight_groups=2),
    "weight groups 2 x offset groups 2 (crossing)": dict(channels=6, out_channels=3, weight_groups=3, offset_groups=2),
    "offsets mostly outside the image": dict(offset_scale=12.0, height=5, width=6),
    "zero offsets (fresh DCN, samples on integers and on -1)": dict(zero_offsets=True),
    "1x1 kernel no padding": dict(kernel=1, padding=0),
    "5x3 image, one output row": dict(height=3, width=5, padding=0, stride=1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fast_equals_torchvision_float64_forward_and_backward(case):
    tensors, conv_kwargs = make_case(**case)
    assert_matches_torchvision(deform_conv2d_fast, tensors, conv_kwargs)


def test_non_square_kernel_matches_torchvision():
    tensors, conv_kwargs = make_case(kernel=3)
    gen = torch.Generator().manual_seed(3)
    tensors["weight"] = torch.randn(6, 4, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    tensors["offset"] = (torch.randn(2, 2 * 2 * 6, 7, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    tensors["mask"] = torch.rand(2, 2 * 6, 7, 9, generator=gen, dtype=torch.float64).requires_grad_()
    assert_matches_torchvision(deform_conv2d_fast, tensors, conv_kwargs)


def test_chunking_over_the_batch_changes_nothing():
    tensors, conv_kwargs = make_case(batch=5)
    whole = run_with_grads(lambda *a, **k: deform_conv2d_columns(*a, **k, column_budget_bytes=1 << 40), tensors, conv_kwargs)
    per_image = run_with_grads(lambda *a, **k: deform_conv2d_columns(*a, **k, column_budget_bytes=1), tensors, conv_kwargs)
    for a, b in zip(whole, per_image):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_groups", [1, 2])
def test_output_keeps_the_input_memory_format_with_torchvision_values(weight_groups):
    """channels_last in -> channels_last out (no layout copies in a channels_last model); NCHW in -> NCHW."""
    tensors, conv_kwargs = make_case(batch=3, channels=4, out_channels=4, weight_groups=weight_groups)
    expected = run_with_grads(torchvision.ops.deform_conv2d, tensors, conv_kwargs)
    plain = run_with_grads(deform_conv2d_fast, tensors, conv_kwargs)
    assert plain[0].is_contiguous()
    last = dict(tensors, input=tensors["input"].detach().to(memory_format=torch.channels_last).requires_grad_())
    nhwc = run_with_grads(deform_conv2d_fast, last, conv_kwargs)
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last) and not nhwc[0].is_contiguous()
    for got in (plain, nhwc):
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def assert_packed_matches_torchvision(backend: str, device: str = "cpu", **case) -> None:
    """deform_conv2d_packed(x, offset_mask) == torchvision with offset_mask split and the sigmoid applied."""
    tensors, conv_kwargs = make_case(device=device, **case)
    taps_groups = tensors["mask"].shape[1]
    logits = torch.randn(tensors["mask"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logits = logits.to(device)
    offset_mask = torch.cat([tensors["offset"].detach(), logits], dim=1).requires_grad_()
    leaves = [tensors["input"], offset_mask, tensors["weight"], tensors["bias"]]
    grad_out = None
    results = []
    for packed in (True, False):
        if packed:
            out = fast_deform.deform_conv2d_packed(tensors["input"], offset_mask, tensors["weight"], tensors["bias"],
                                                   backend=backend, **conv_kwargs)
        else:
            split = 2 * taps_groups
            out = torchvision.ops.deform_conv2d(tensors["input"], offset_mask[:, :split], tensors["weight"],
                                                tensors["bias"], mask=offset_mask[:, split:].sigmoid(), **conv_kwargs)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
            grad_out = grad_out.to(device)
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for name, a, e in zip(("output", "input", "offset_mask", "weight", "bias"), *results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_packed_offsets_and_mask_logits_equal_the_split_form():
    assert_packed_matches_torchvision("torch")
    with pytest.raises(ValueError, match="3\\*G\\*9 channels"):
        fast_deform.deform_conv2d_packed(torch.randn(1, 4, 5, 5), torch.randn(1, 26, 5, 5), torch.randn(4, 4, 3, 3),
                                         padding=1)


def counting_sampler(monkeypatch) -> list[str]:
    """Replace the torch sampler with one that records each sampling call ("sample" / "backward")."""
    calls: list[str] = []
    base = deform_sampler.TORCH_SAMPLER

    def sample(*args, **kwargs):
        calls.append("sample")
        return base.sample(*args, **kwargs)

    def backward(*args, **kwargs):
        calls.append("backward")
        return base.backward(*args, **kwargs)

    monkeypatch.setattr(deform_sampler, "TORCH_SAMPLER", deform_sampler.Sampler("counting", sample, backward,
                                                                                base.column_dtype_bytes))
    return calls


@pytest.mark.parametrize("keep", [True, False])
def test_kept_columns_spare_the_backward_a_second_sampling_with_equal_gradients(monkeypatch, keep):
    calls = counting_sampler(monkeypatch)
    tensors, conv_kwargs = make_case(batch=3)
    options = DeformOptions(keep_columns=keep)
    fn = lambda *a, **k: deform_conv2d_columns(*a, **k, backend="torch", column_budget_bytes=1, options=options)
    assert_matches_torchvision(fn, tensors, conv_kwargs)  # 3 chunks of one image
    expected = ["sample"] * 3 + ["backward"] * 3 if keep else ["sample"] * 3 + ["sample", "backward"] * 3
    assert calls == expected


def test_bf16_input_gradient_accumulated_in_bf16_stays_close_to_float64():
    tensors, conv_kwargs = make_case(batch=2, channels=8, out_channels=8, offset_scale=1.0)
    expected = run_with_grads(torchvision.ops.deform_conv2d, tensors, conv_kwargs)
    low_tensors = {k: None if v is None else v.detach().bfloat16().requires_grad_() for k, v in tensors.items()}
    errors = {}
    for low in (False, True):
        fn = lambda *a, **k: deform_conv2d_columns(*a, **k, options=DeformOptions(low_precision_input_grad=low))
        grad_input = run_with_grads(fn, low_tensors, conv_kwargs)[1]
        assert grad_input.dtype == torch.bfloat16
        errors[low] = ((grad_input.double() - expected[1]).abs().max() / expected[1].abs().max()).item()
    assert errors[True] < 2e-2, errors  # bf16 has 8 bits of mantissa: ~4e-3 per rounding
    assert errors[True] < 4 * errors[False] + 1e-3, errors


def test_gradcheck_tiny_case():
    tensors, conv_kwargs = make_case(batch=1, channels=2, out_channels=2, height=4, width=4, offset_groups=2, offset_scale=1.0)
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"])

    def fn(x, offset, weight, bias, mask):
        return deform_conv2d_fast(x, offset, weight, bias, mask=mask, **conv_kwargs)

    assert torch.autograd.gradcheck(fn, (*args, tensors["mask"]), eps=1e-6, atol=1e-7)


def test_only_some_inputs_need_grad():
    tensors, conv_kwargs = make_case()
    for name in ("input", "offset", "mask", "bias"):
        tensors[name].requires_grad_(False)
    out = deform_conv2d_fast(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                             mask=tensors["mask"], **conv_kwargs)
    (grad_weight,) = torch.autograd.grad(out.sum(), [tensors["weight"]])
    expected = torchvision.ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                                             mask=tensors["mask"], **conv_kwargs)
    torch.testing.assert_close(grad_weight, torch.autograd.grad(expected.sum(), [tensors["weight"]])[0])


def test_bfloat16_runs_and_stays_close_to_float64():
    tensors, conv_kwargs = make_case(channels=16, out_channels=8, height=9, width=10, offset_scale=1.5)
    reference = torchvision.ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                                              mask=tensors["mask"], **conv_kwargs)
    low = deform_conv2d_fast(tensors["input"].bfloat16(), tensors["offset"].float(), tensors["weight"].bfloat16(),
                             tensors["bias"].bfloat16(), mask=tensors["mask"].float(), **conv_kwargs)
    assert low.dtype == torch.bfloat16
    assert ((low.double() - reference).abs().max() / reference.abs().max()).item() < 2e-2
    low.float().sum().backward()  # backward runs in bf16 too
    assert tensors["input"].grad.dtype == torch.float64 and torch.isfinite(tensors["input"].grad).all()


def test_autocast_runs_in_the_autocast_dtype_like_conv2d():
    tensors, conv_kwargs = make_case(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d_fast(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                                 mask=tensors["mask"], **conv_kwargs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert tensors["weight"].grad.dtype == torch.float32 and tensors["offset"].grad.dtype == torch.float32


def test_empty_batch_gives_empty_output():
    tensors, conv_kwargs = make_case(batch=0)
    out = deform_conv2d_fast(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                             mask=tensors["mask"], **conv_kwargs)
    assert out.shape == (0, 6, 7, 8)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(offset=t["offset"][:, :-1]), "offset has 35 channels"),
    (lambda t: t.update(mask=t["mask"][:, :-1]), "mask"),
    (lambda t: t.update(bias=t["bias"][:-1]), "bias"),
    (lambda t: t.update(offset=t["offset"][:, :, :-1]), "offset"),
    (lambda t: t.update(weight=t["weight"][:, :3]), "weight"),
])
def test_inconsistent_shapes_raise_value_error(change, message):
    tensors, conv_kwargs = make_case()
    change(tensors)
    with pytest.raises(ValueError, match=message):
        deform_conv2d_fast(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                           mask=tensors["mask"], **conv_kwargs)


def test_select_returns_each_implementation_and_rejects_unknown():
    assert select_deform_conv2d("torchvision") is torchvision.ops.deform_conv2d
    assert select_deform_conv2d("fast") is deform_conv2d_fast
    assert select_deform_conv2d("auto") is fast_deform.deform_conv2d_auto
    with pytest.raises(ValueError, match="impl must be one of"):
        select_deform_conv2d("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        tensors, conv_kwargs = make_case()
        deform_conv2d_columns(tensors["input"], tensors["offset"], tensors["weight"], backend="cutlass", **conv_kwargs)


def test_auto_matches_torchvision_on_cpu_and_handles_bfloat16():
    tensors, conv_kwargs = make_case(dtype=torch.float32)
    auto = select_deform_conv2d("auto")
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"])
    torch.testing.assert_close(auto(*args, mask=tensors["mask"], **conv_kwargs),
                               torchvision.ops.deform_conv2d(*args, mask=tensors["mask"], **conv_kwargs))
    low = auto(tensors["input"].bfloat16(), tensors["offset"], tensors["weight"].bfloat16(), None,
               mask=tensors["mask"], **conv_kwargs)
    assert low.dtype == torch.bfloat16


TRITON_INTERPRETER_SCRIPT = """
import torch, torchvision
import tests.fast.test_fast_deform as t
from detector.fast.deform import DeformOptions, deform_conv2d_columns
for options in (DeformOptions(keep_columns=True), DeformOptions(keep_columns=False)):
    fn = lambda *a, **k: deform_conv2d_columns(*a, **k, backend="triton", options=options)
    for case in (dict(), dict(zero_offsets=True, use_bias=False),
                 dict(batch=2, channels=40, out_channels=70, offset_groups=1),  # several channel blocks
                 dict(stride=2, dilation=2, padding=2, use_mask=False, height=9, width=9, offset_scale=6.0,
                      channels=6, out_channels=3, weight_groups=3)):
        tensors, conv_kwargs = t.make_case(**dict(dict(batch=1), **case))
        t.assert_matches_torchvision(fn, tensors, conv_kwargs)
# bf16 offsets / masks straight from a bf16 predictor: read as is, their gradients written in bf16,
# equal to the torch sampler's float32 path up to one bf16 rounding
tensors, conv_kwargs = t.make_case(batch=1, dtype=torch.float32, offset_scale=1.0)
for name in ("offset", "mask"):
    tensors[name] = tensors[name].detach().bfloat16().requires_grad_()
fast = t.run_with_grads(lambda *a, **k: deform_conv2d_columns(*a, **k, backend="triton"), tensors, conv_kwargs)
reference = t.run_with_grads(lambda *a, **k: deform_conv2d_columns(*a, **k, backend="torch"), tensors, conv_kwargs)
for got, want in zip(fast, reference):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    tolerance = 1e-2 if got.dtype == torch.bfloat16 else 1e-5
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tolerance
# the packed form: offsets and mask logits in one tensor, sigmoid in the kernels
for case in (dict(), dict(zero_offsets=True, stride=2, padding=0, height=9, width=10)):
    t.assert_packed_matches_torchvision("triton", **case)
print("triton interpreter ok")
"""


def test_triton_kernels_match_torchvision_under_the_interpreter():
    pytest.importorskip("triton")
    from triton_interpreter import run_under_interpreter  # here: the subprocess imports this test module, without tests/ on its path
    result = run_under_interpreter(TRITON_INTERPRETER_SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton interpreter ok" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [{}, dict(zero_offsets=True), dict(stride=2, dilation=2, padding=2, offset_groups=1),
                                  dict(channels=40, out_channels=70, offset_groups=1)])
@pytest.mark.parametrize("keep", [True, False])
def test_cuda_fast_matches_torchvision_float64(case, keep):
    tensors, conv_kwargs = make_case(device="cuda", **case)
    options = DeformOptions(keep_columns=keep)
    assert_matches_torchvision(lambda *a, **k: deform_conv2d_columns(*a, **k, options=options), tensors, conv_kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_offsets_and_mask_logits_equal_the_split_form():
    assert_packed_matches_torchvision("triton", device="cuda")
    assert_packed_matches_torchvision("triton", device="cuda", zero_offsets=True, channels=64, out_channels=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_input_grad_atomics_are_as_accurate_as_float32_ones():
    tensors, conv_kwargs = make_case(device="cuda", batch=2, channels=64, out_channels=64, height=20, width=24,
                                     offset_scale=1.0)
    expected = run_with_grads(torchvision.ops.deform_conv2d, tensors, conv_kwargs)
    low_tensors = {k: None if v is None else v.detach().bfloat16().requires_grad_() for k, v in tensors.items()}

    def worst_error(options):
        fn = lambda *a, **k: deform_conv2d_columns(*a, **k, backend="triton", options=options)
        return max(((a.double() - e).abs().max() / e.abs().max()).item()
                   for a, e in zip(run_with_grads(fn, low_tensors, conv_kwargs), expected))

    float32_atomics = worst_error(DeformOptions(low_precision_input_grad=False))
    assert worst_error(DeformOptions(low_precision_input_grad=True)) < 2 * float32_atomics + 1e-3


def test_packed_impl_follows_the_impl_and_the_packed_option(monkeypatch):
    x = torch.randn(1, 4, 5, 5)
    assert fast_deform.packed_impl(fast_deform.deform_conv2d_fast, x) is fast_deform.deform_conv2d_packed
    assert fast_deform.packed_impl(torchvision.ops.deform_conv2d, x) is None
    assert fast_deform.packed_impl(fast_deform.deform_conv2d_auto, x) is None  # auto runs torchvision on CPU fp32
    monkeypatch.setattr(fast_deform, "DEFAULT_OPTIONS", DeformOptions(packed=False))
    assert fast_deform.packed_impl(fast_deform.deform_conv2d_fast, x) is None
