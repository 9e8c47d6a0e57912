"""Op tables (DESIGN section 4): every op builds, keeps shapes, trains; structure details that
decide whether the published architecture replays (norms, biases, inits, the ``cat`` quirk, DCN)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.arch.grammar import AGGREGATIONS, FPN_OPS, HEAD_OPS
from detector.fast.deform_layer import FastModulatedDeformConv, deform_kernel, set_deform_kernel
from detector.model.deform import ModulatedDeformConv
from detector.model.ops import (
    AGGREGATION_TABLE,
    FPN_OP_TABLE,
    HEAD_OP_TABLE,
    build_aggregation,
    build_fpn_op,
    build_head_op,
)
from torch_threads import single_thread  # noqa: F401  (autouse: one torch thread per module)

WIDTH = 32


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dcn_params(w: int) -> int:
    # deformable 3x3 weight + bias, offset/mask predictor 3x3 conv w -> 54 with bias
    return 9 * w * w + w + 54 * 9 * w + 54


# Per-op parameter formulas for width w (the norm adds 2w: BN or GN affine).
FPN_OP_PARAMS = {
    "sep3": lambda w: 9 * w + w * w + 2 * w,
    "sep3d3": lambda w: 9 * w + w * w + 2 * w,
    "sep5d6": lambda w: 25 * w + w * w + 2 * w,
    "skip": lambda w: 0,
    "dcn": lambda w: _dcn_params(w) + 2 * w,
}
HEAD_OP_PARAMS = {
    "conv1": lambda w: w * w + 2 * w,
    "conv3": lambda w: 9 * w * w + 2 * w,
    "sep3": lambda w: 9 * w + w * w + 2 * w,
    "sep3d3": lambda w: 9 * w + w * w + 2 * w,
    "skip": lambda w: 0,
    "dcn": lambda w: _dcn_params(w) + 2 * w,
}
AGG_PARAMS = {"sum": lambda w: 2 * w, "cat": lambda w: 4 * w + 2 * w}


def test_tables_name_exactly_the_grammar_ops():
    assert tuple(FPN_OP_TABLE) == FPN_OPS
    assert tuple(AGGREGATION_TABLE) == AGGREGATIONS
    assert tuple(HEAD_OP_TABLE) == HEAD_OPS
    assert set(FPN_OP_PARAMS) == set(FPN_OPS) and set(HEAD_OP_PARAMS) == set(HEAD_OPS)


def _forward_backward_unary(op: nn.Module, shape=(2, WIDTH, 9, 13)) -> torch.Tensor:
    x = torch.randn(*shape, requires_grad=True)
    out = op(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in op.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    return out


@pytest.mark.parametrize("name", FPN_OPS)
def test_every_fpn_op_keeps_shape_trains_and_has_the_documented_parameter_count(name):
    op = build_fpn_op(name, WIDTH)
    _forward_backward_unary(op)
    assert _num_params(op) == FPN_OP_PARAMS[name](WIDTH)
    if name != "skip":  # BatchNorm then ReLU closes every FPN op
        assert isinstance(op[-2], nn.BatchNorm2d) and isinstance(op[-1], nn.ReLU)


@pytest.mark.parametrize("name", HEAD_OPS)
def test_every_head_op_keeps_shape_trains_and_has_the_documented_parameter_count(name):
    op = build_head_op(name, WIDTH)
    _forward_backward_unary(op)
    assert _num_params(op) == HEAD_OP_PARAMS[name](WIDTH)
    if name != "skip":  # GroupNorm(32) then ReLU closes every head op
        assert isinstance(op[-2], nn.GroupNorm) and op[-2].num_groups == 32 and isinstance(op[-1], nn.ReLU)


@pytest.mark.parametrize("table", [FPN_OP_TABLE, HEAD_OP_TABLE])
def test_skip_is_a_pure_identity_in_both_spaces(table):
    op = table["skip"](WIDTH)
    x = torch.randn(1, WIDTH, 5, 5)
    assert op(x) is x
    assert _num_params(op) == 0


@pytest.mark.parametrize("name", ["conv1", "conv3", "sep3", "sep3d3"])
def test_head_convs_have_no_bias(name):
    convs = [m for m in build_head_op(name, WIDTH).modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)


@pytest.mark.parametrize("name, kernel, dilation", [("sep3", 3, 1), ("sep3d3", 3, 3), ("sep5d6", 5, 6)])
def test_separable_convs_are_depthwise_dilated_then_pointwise_without_bias(name, kernel, dilation):
    depthwise, pointwise = build_fpn_op(name, WIDTH)[:2]
    assert depthwise.groups == WIDTH and depthwise.kernel_size == (kernel, kernel)
    assert depthwise.dilation == (dilation, dilation)
    assert depthwise.padding == (dilation * (kernel - 1) // 2,) * 2
    assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
    assert depthwise.bias is None and pointwise.bias is None


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_every_aggregation_merges_two_maps_and_trains(name):
    agg = build_aggregation(name, WIDTH)
    x = torch.randn(2, WIDTH, 6, 7, requires_grad=True)
    y = torch.randn(2, WIDTH, 6, 7, requires_grad=True)
    out = agg(x, y)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is not None for p in agg.parameters())
    assert _num_params(agg) == AGG_PARAMS[name](WIDTH)


def test_sum_starts_as_plain_addition_with_per_channel_weights():
    agg = build_aggregation("sum", WIDTH)
    x, y = torch.randn(2, WIDTH, 4, 4), torch.randn(2, WIDTH, 4, 4)
    assert torch.allclose(agg(x, y), x + y)
    assert agg.a.shape == agg.b.shape == (WIDTH,)


def test_cat_keeps_the_authors_grouped_reduce_quirk():
    agg = build_aggregation("cat", WIDTH).eval()  # eval: BN uses running stats, channels independent
    bn, relu, conv = agg.reduce
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 2 * WIDTH and isinstance(relu, nn.ReLU)
    assert conv.groups == WIDTH and conv.in_channels == 2 * WIDTH and conv.out_channels == WIDTH
    assert conv.bias is None
    x, y = torch.randn(1, WIDTH, 4, 4), torch.randn(1, WIDTH, 4, 4)
    base = agg(x, y)
    half = WIDTH // 2
    moved_y = agg(x, y + 1.0)  # first half of the outputs sees only x
    assert torch.equal(base[:, :half], moved_y[:, :half]) and not torch.equal(base[:, half:], moved_y[:, half:])
    moved_x = agg(x + 1.0, y)  # second half sees only y
    assert torch.equal(base[:, half:], moved_x[:, half:]) and not torch.equal(base[:, :half], moved_x[:, :half])


def test_dcn_predicts_54_offset_and_mask_channels_from_a_zero_initialised_conv():
    dcn = ModulatedDeformConv(WIDTH, WIDTH, 3, offset_groups=2)
    predictor = dcn.offset_mask
    assert predictor.out_channels == 2 * 2 * 9 + 2 * 9 == 54
    assert predictor.kernel_size == (3, 3) and predictor.bias is not None
    assert predictor.weight.abs().sum() == 0 and predictor.bias.abs().sum() == 0
    assert dcn.bias is not None and dcn.bias.abs().sum() == 0


def test_fresh_dcn_is_a_regular_conv_with_masks_at_one_half():
    # Zero offsets sample the regular grid; sigmoid(0) = 0.5 scales every tap; the bias is not masked.
    dcn = ModulatedDeformConv(WIDTH, 16, 3)
    nn.init.normal_(dcn.bias)
    x = torch.randn(2, WIDTH, 7, 9)
    expected = F.conv2d(x, 0.5 * dcn.weight, dcn.bias, padding=1)
    assert torch.allclose(dcn(x), expected, atol=1e-5)


def test_dcn_offsets_move_the_sampling_points():
    dcn = ModulatedDeformConv(WIDTH, WIDTH, 3)
    x = torch.randn(1, WIDTH, 8, 8)
    before = dcn(x)
    with torch.no_grad():
        dcn.offset_mask.bias[:36] = 0.7  # shift every tap by 0.7 px in both directions
    assert not torch.allclose(dcn(x), before, atol=1e-4)


def test_dcn_under_bf16_autocast_runs_in_float32_and_returns_bf16():
    dcn = ModulatedDeformConv(WIDTH, WIDTH, 3)
    with torch.no_grad():
        dcn.offset_mask.weight.normal_(std=0.01)  # non-trivial offsets
    x = torch.randn(1, WIDTH, 8, 8)
    reference = dcn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)


def test_dcn_accepts_bfloat16_modules_and_inputs():
    dcn = ModulatedDeformConv(WIDTH, WIDTH, 3).to(torch.bfloat16)
    x = torch.randn(1, WIDTH, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    out = dcn(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert dcn.weight.grad is not None and dcn.weight.grad.dtype == torch.bfloat16


def test_the_fast_deform_kernel_can_replace_torchvision_behind_the_per_model_switch():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv(WIDTH, WIDTH, 3)
    with torch.no_grad():
        dcn.offset_mask.weight.normal_(std=0.05)
    keys = list(dcn.state_dict())
    x = torch.randn(2, WIDTH, 7, 9, requires_grad=True)
    assert deform_kernel(dcn) == "torchvision"  # a freshly built module is the reference
    reference = dcn(x)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    set_deform_kernel(dcn, "fast")
    assert type(dcn) is FastModulatedDeformConv and deform_kernel(dcn) == "fast"
    assert list(dcn.state_dict()) == keys
    fast = dcn(x)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, reference_grad, atol=1e-4, rtol=1e-4)
    set_deform_kernel(dcn, "torchvision")
    assert type(dcn) is ModulatedDeformConv and deform_kernel(dcn) == "torchvision"
    with pytest.raises(ValueError, match="unknown"):
        set_deform_kernel(dcn, "cuda_v3")


def test_two_models_in_threads_of_one_process_keep_their_own_deform_kernels(monkeypatch):
    """The kernel belongs to the model (executor=local runs trials as threads of one process)."""
    import threading

    from detector.fast import deform as fast_deform

    calls = {"fast": 0}
    real_kernel = fast_deform._deform_conv2d  # both fast entry points (packed and split) go through it

    def counting_kernel(*args, **kwargs):
        calls["fast"] += 1
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(fast_deform, "_deform_conv2d", counting_kernel)
    torch.manual_seed(0)
    reference_model, fast_model = ModulatedDeformConv(WIDTH, WIDTH, 3), ModulatedDeformConv(WIDTH, WIDTH, 3)
    fast_model.load_state_dict(reference_model.state_dict())
    set_deform_kernel(fast_model, "fast")
    x = torch.randn(1, WIDTH, 6, 6)
    outputs, barrier = {}, threading.Barrier(2)

    def run(name, model):
        barrier.wait()
        with torch.no_grad():
            outputs[name] = [model(x) for _ in range(3)]

    threads = [threading.Thread(target=run, args=item) for item in (("reference", reference_model), ("fast", fast_model))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert deform_kernel(reference_model) == "torchvision" and deform_kernel(fast_model) == "fast"
    assert calls["fast"] == 3  # the fast model's three calls, none of the reference model's
    for ref, fast in zip(outputs["reference"], outputs["fast"]):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_unknown_op_names_and_bad_group_norm_widths_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown FPN op 'conv9'.*sep3"):
        build_fpn_op("conv9", WIDTH)
    with pytest.raises(ValueError, match="unknown head op"):
        build_head_op("sep5d6", WIDTH)
    with pytest.raises(ValueError, match="unknown aggregation"):
        build_aggregation("max", WIDTH)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_head_op("conv3", 48)
