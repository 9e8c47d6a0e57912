"""Every fast path computes what its reference computes (detector/fast/switch.py and the files it swaps in).

- dense losses == reference losses (values and gradients, both recipes, an image without boxes),
  and the fast train forward has no op that forces a device-to-host sync (the reference has some);
- batched post-processing == reference detections (thresholds, top-k caps, empty results);
- dtype-keeping FrozenBatchNorm: reference values in float32, dtype and layout kept in bf16;
- the fused GroupNorm's Triton kernels == F.group_norm (+ ReLU), forward and backward, NCHW and
  channels_last, several tiles, float32 and bf16 (Triton's CPU interpreter in a subprocess; on
  CUDA directly when a GPU is present);
- switching fast paths on and off keeps the state dict and the model's outputs.
"""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d

from triton_interpreter import run_under_interpreter

from detector.fast.postprocess import postprocess_batched
from detector.model.build import build_detector
from detector.fast.loss import compute_losses_dense
from detector.fast.norm import DtypeKeepingFrozenBatchNorm2d, FusedGroupNorm
from detector.fast.switch import FAST_PATHS, FastPathError, PointsCache, active_fast_paths, parse_paths, set_fast_paths
from detector.model.loss import compute_losses
from detector.model.points import make_points, points_for
from detector.model.postprocess import postprocess
from detector.bench.models import load_recipe
from detector.arch.zoo import zoo_arch

RECIPES = {name: load_recipe(name) for name in ("nasfcos", "torchvision")}
SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # P3..P7 of a 128x160 padded batch
NUM_CLASSES = 6


def random_head_out(batch: int, sizes=SIZES, num_classes=NUM_CLASSES, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = {
        "cls_logits": [torch.randn(batch, num_classes, h, w, generator=gen) - 2.0 for h, w in sizes],
        "bbox_reg": [torch.rand(batch, 4, h, w, generator=gen) * 4 for h, w in sizes],
        "centerness": [torch.randn(batch, 1, h, w, generator=gen) for h, w in sizes],
    }
    return {k: [t.requires_grad_(requires_grad) for t in v] for k, v in out.items()}


def some_targets():
    return [
        {"boxes": torch.tensor([[10.0, 12, 70, 90], [30, 40, 50, 60], [0, 0, 150, 120]]), "labels": torch.tensor([1, 4, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no boxes
        {"boxes": torch.tensor([[5.0, 5, 40, 30]]), "labels": torch.tensor([5])},
    ]


# --- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe_name", ["nasfcos", "torchvision"])
def test_dense_losses_equal_reference_values_and_gradients(recipe_name):
    recipe = RECIPES[recipe_name]
    points = make_points(SIZES, recipe.point_offset)
    results = []
    for loss_fn in (compute_losses, compute_losses_dense):
        head_out = random_head_out(3, requires_grad=True)
        losses = loss_fn(head_out, points, some_targets(), recipe, NUM_CLASSES)
        sum(losses.values()).backward()
        grads = torch.cat([t.grad.flatten() for v in head_out.values() for t in v])
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (ref, ref_grads), (fast, fast_grads) = results
    assert set(ref) == set(fast)
    for key in ref:
        assert ref[key] > 0
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=1e-7)
    assert torch.isfinite(fast_grads).all()
    torch.testing.assert_close(fast_grads, ref_grads, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("recipe_name", ["nasfcos", "torchvision"])
def test_dense_losses_without_any_box_are_finite_with_zero_box_terms(recipe_name):
    recipe = RECIPES[recipe_name]
    points = make_points(SIZES, recipe.point_offset)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    fast = compute_losses_dense(random_head_out(2), points, empty, recipe, NUM_CLASSES)
    ref = compute_losses(random_head_out(2), points, empty, recipe, NUM_CLASSES)
    assert float(fast["bbox_regression"]) == 0.0 and float(fast["bbox_ctrness"]) == 0.0
    torch.testing.assert_close(fast["classification"], ref["classification"])


class SyncOps(TorchDispatchMode):
    """Counts the ATen ops that make the host wait for the device (or are boolean-mask indexing)."""

    SYNCING = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.unique", "aten.item")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name.startswith(self.SYNCING) or boolean_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def small_detector(recipe_name: str, fast: bool):
    torch.manual_seed(0)
    model = build_detector(zoo_arch("fcos"), NUM_CLASSES, RECIPES[recipe_name], "resnet18", width=64,
                           frozen_stages=1, norm="frozen_bn")
    return set_fast_paths(model, "all" if fast else "none")


def test_fast_train_forward_needs_one_host_sync_the_reference_more():
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112), torch.rand(3, 64, 64)]
    counts = {}
    for fast in (False, True):
        model = small_detector("torchvision", fast).train()
        model(images, some_targets())  # warm caches (size ranges, points) like a second step
        with SyncOps() as ops:
            model(images, some_targets())
        counts[fast] = ops.seen
    # the fast step: only the batch-wide degenerate-box check reads one boolean back
    assert counts[True] == ["aten._local_scalar_dense"]
    assert "aten.nonzero" in counts[False] and len(counts[False]) > len(counts[True])


# --- post-processing ---------------------------------------------------------------------------

@pytest.mark.parametrize("recipe_name,topk,shift", [("nasfcos", 1000, 2.0), ("torchvision", 1000, 0.0),
                                                     ("torchvision", 7, 2.0), ("nasfcos", 50, -8.0)])
def test_batched_postprocess_equals_reference(recipe_name, topk, shift):
    recipe = dataclasses.replace(RECIPES[recipe_name], topk_per_level=topk)
    head_out = random_head_out(3, seed=3)
    head_out["cls_logits"] = [t + shift for t in head_out["cls_logits"]]
    points = make_points(SIZES, recipe.point_offset)
    sizes = [(128, 160), (100, 150), (64, 90)]
    reference = postprocess(head_out, points, sizes, recipe)
    batched = postprocess_batched(head_out, points, sizes, recipe)
    for ref, fast in zip(reference, batched):
        assert set(ref) == set(fast)
        for key in ref:
            assert torch.equal(ref[key], fast[key]), key
    if shift == -8.0:
        assert all(len(d["scores"]) == 0 for d in batched)
    else:
        assert all(len(d["scores"]) > 0 for d in batched)


# --- norms -------------------------------------------------------------------------------------

def frozen_bn(channels=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=gen))
    bn.running_mean.copy_(torch.randn(channels, generator=gen))
    bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.1)
    return bn


def test_dtype_keeping_frozen_bn_matches_reference_and_keeps_bf16():
    bn = frozen_bn()
    x = torch.randn(2, 16, 5, 7).to(memory_format=torch.channels_last)
    reference = bn(x)
    bn.__class__ = DtypeKeepingFrozenBatchNorm2d
    torch.testing.assert_close(bn(x), reference, rtol=1e-6, atol=1e-6)
    out = bn(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    assert bn.state_dict().keys() == frozen_bn().state_dict().keys()


def test_frozen_bn_scale_cache_follows_new_buffers_and_inference_mode():
    fast = frozen_bn()
    fast.__class__ = DtypeKeepingFrozenBatchNorm2d
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    with torch.inference_mode():
        fast(x.detach())  # caches inference-mode scale/shift
    fast(x).sum().backward()  # training must not receive them
    assert x.grad is not None
    other = frozen_bn(seed=1)
    fast.load_state_dict(other.state_dict())  # in-place buffer copies: the cache must notice
    torch.testing.assert_close(fast(x), other(x), rtol=1e-6, atol=1e-6)


def test_fused_group_norm_on_cpu_is_the_reference_with_relu():
    torch.manual_seed(0)
    reference = nn.GroupNorm(4, 16)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    x = torch.randn(2, 16, 6, 5)
    expected = F.relu(reference(x))
    reference.__class__ = FusedGroupNorm
    reference.fuse_relu = True
    assert torch.equal(reference(x), expected)


TRITON_CHECK = textwrap.dedent("""
    import torch
    from torch.nn import functional as F
    from detector.fast.triton import group_norm as gn_triton

    def check(shape, groups, layout, relu, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        n, c, h, w = shape
        x = (torch.randn(shape, generator=gen) * 3 + 5).to(dtype)
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
        grad = torch.randn(shape, generator=gen).to(dtype)
        y, mean, rstd = gn_triton.group_norm_forward(x, weight, bias, groups, 1e-5, relu)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")
        xr = x.double().requires_grad_()
        wr, br = weight.double().requires_grad_(), bias.double().requires_grad_()
        yr = F.group_norm(xr, groups, wr, br, 1e-5)
        yr = F.relu(yr) if relu else yr
        yr.backward(grad.double())
        dx, dw, db = gn_triton.group_norm_backward(grad, y if relu else None, x, mean, rstd, weight, groups)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name, got, want in (("y", y, yr), ("dx", dx, xr.grad), ("dgamma", dw, wr.grad), ("dbeta", db, br.grad)):
            err = float((got.double() - want).norm() / want.norm().clamp(min=1e-12))
            assert err < tol, (shape, layout, relu, dtype, name, err)

    check((2, 16, 5, 7), 4, "nchw", True, torch.float32, 0)
    check((2, 16, 5, 7), 4, "nhwc", False, torch.float32, 1)
    check((1, 64, 9, 40), 8, "nhwc", True, torch.float32, 2)  # 64 channels: 128-row tiles, 3 tiles
    gn_triton.FINALIZE_TILES = 2  # the finalize kernels now loop: 2 steps over the 3 tiles
    check((1, 64, 9, 40), 8, "nchw", True, torch.float32, 3)
    check((2, 256, 5, 15), 32, "nhwc", True, torch.float32, 4)  # the decoder's width: 32-row tiles
    check((2, 32, 4, 6), 8, "nhwc", True, torch.bfloat16, 5)

    # the module and its autograd function, with the kernels allowed on CPU tensors
    from torch import nn
    from detector.fast import norm as fast_norm
    fast_norm.can_fuse = lambda x, module: True
    torch.manual_seed(5)
    reference = nn.Sequential(nn.GroupNorm(4, 16), nn.ReLU())
    nn.init.normal_(reference[0].weight)
    nn.init.normal_(reference[0].bias)
    x = (torch.randn(2, 16, 6, 5) + 2).to(memory_format=torch.channels_last).requires_grad_()
    expected = reference(x)
    expected.sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in reference.parameters()]
    x.grad = None
    reference.zero_grad()
    fused = reference[0]
    fused.__class__ = fast_norm.FusedGroupNorm
    fused.fuse_relu = True
    got = fused(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, w in zip([x.grad] + [p.grad for p in fused.parameters()], want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x.detach()), expected.detach(), rtol=1e-5, atol=1e-5)
    sliced = torch.randn(2, 16, 6, 10)[..., ::2]  # H and W do not merge: copied first
    torch.testing.assert_close(fused(sliced), torch.relu(nn.functional.group_norm(sliced, 4, fused.weight, fused.bias)),
                               rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_triton_group_norm_kernels_match_group_norm_under_the_interpreter():
    pytest.importorskip("triton")
    proc = run_under_interpreter(TRITON_CHECK, timeout=240, OMP_NUM_THREADS="1")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_group_norm_on_cuda_matches_the_reference(layout, dtype):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.GroupNorm(32, 256), nn.ReLU()).cuda()
    nn.init.normal_(reference[0].weight)
    nn.init.normal_(reference[0].bias)
    x = (torch.randn(4, 256, 50, 76, device="cuda") * 2 + 3).to(dtype).to(memory_format=layout)
    grad = torch.randn_like(x)
    x_ref = x.detach().float().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(grad.float())
    ref_grads = [x_ref.grad] + [p.grad.clone() for p in reference.parameters()]
    reference.zero_grad()
    fused = reference[0]
    fused.__class__ = FusedGroupNorm
    fused.fuse_relu = True
    x_fast = x.detach().requires_grad_()
    y = fused(x_fast)
    y.backward(grad)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip([y, x_fast.grad] + [p.grad for p in fused.parameters()], [y_ref] + ref_grads):
        assert float((got.float() - want).norm() / want.norm()) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_inference_replays_eager_results_and_follows_weight_changes():
    model = small_detector("torchvision", fast=True).cuda().eval()
    images = [torch.rand(3, 96, 128, device="cuda"), torch.rand(3, 80, 112, device="cuda")]
    with torch.no_grad():
        set_fast_paths(model, [p for p in FAST_PATHS if p != "cuda_graphs"])
        eager = model(images)
        set_fast_paths(model, "all")
        model(images)  # capture
        replayed = model(images)
        assert len(model.graphs) == 1 and not model.graphs.failures
        assert all(torch.equal(a[k], b[k]) for a, b in zip(eager, replayed) for k in a)
        model.head.cls_logits.bias.add_(3.0)  # in place: the graph must not serve stale results
        changed = model(images)
        set_fast_paths(model, [p for p in FAST_PATHS if p != "cuda_graphs"])
        expected = model(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(changed, expected) for k in a)


# --- switching ---------------------------------------------------------------------------------

def test_fast_paths_switch_on_and_off_keeping_state_dict_and_outputs():
    model = small_detector("nasfcos", fast=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected = model(images)
    set_fast_paths(model, "all")
    # resize / cat_reduce swap searched-FPN modules, which the fcos code has none of
    assert active_fast_paths(model) == tuple(p for p in FAST_PATHS if p not in ("resize", "cat_reduce"))
    assert any(type(m) is FusedGroupNorm and m.fuse_relu for m in model.modules())
    assert not any(type(m) is nn.ReLU for m in model.head.cls_tower.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    set_fast_paths(model, "none")
    assert active_fast_paths(model) == ()
    assert not any(type(m) in (FusedGroupNorm, DtypeKeepingFrozenBatchNorm2d) for m in model.modules())
    assert sum(type(m) is nn.ReLU for m in model.head.cls_tower.modules()) == 4
    with torch.no_grad():
        again = model(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(expected, again) for k in a)


def test_training_after_inference_mode_evaluation_with_every_fast_path():
    model = small_detector("nasfcos", fast=True)
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    with torch.inference_mode():
        model.eval()(images)  # fills the points cache at the training batch's sizes
    losses = model.train()(images, some_targets()[:2])
    sum(losses.values()).backward()  # no inference tensor reaches autograd
    assert all(torch.isfinite(v) for v in losses.values())


def test_parse_paths_accepts_all_none_lists_and_rejects_unknown_names():
    assert parse_paths("all") == FAST_PATHS and parse_paths("none") == () and parse_paths(None) == ()
    assert parse_paths("losses, points") == ("losses", "points") and parse_paths(["frozen_bn"]) == ("frozen_bn",)
    with pytest.raises(FastPathError, match="unknown fast path"):
        parse_paths("losses,warp_speed")


def test_points_cache_returns_the_computed_points_and_evicts_the_oldest():
    cache = PointsCache(capacity=2)
    features = [torch.zeros(1, 1, h, w) for h, w in SIZES]
    first = cache.get(features, 0.5)
    assert cache.get(features, 0.5) is first
    expected = points_for(features, 0.5)
    assert torch.equal(first.xy, expected.xy) and first.num_per_level == expected.num_per_level
    for width in (3, 4):
        cache.get([torch.zeros(1, 1, 2, width)] * 5, 0.5)
    assert cache.get(features, 0.5) is not first  # evicted, recomputed


# --- searched-FPN pieces (resize, cat_reduce) --------------------------------------------------

@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("sizes", [((5, 7), (10, 14)), ((6, 8), (24, 32)), ((13, 19), (25, 38)),
                                   ((10, 14), (5, 7)), ((9, 11), (4, 17))])
def test_resize_gemm_is_bilinear_interpolate_in_values_gradients_and_layout(layout, sizes):
    from detector.fast.fpn import resize_gemm

    (h, w), size = sizes
    x = torch.randn(2, 3, h, w, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    grad = torch.randn(2, 3, *size, dtype=torch.float64)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    got = resize_gemm(x, size)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=layout)
    assert resize_gemm(x, (h, w)) is x


def test_resize_gemm_matrices_made_in_inference_mode_do_not_break_training():
    from detector.fast.fpn import resize_gemm

    with torch.inference_mode():
        resize_gemm(torch.randn(1, 2, 3, 5), (6, 10))
    x = torch.randn(1, 2, 3, 5, requires_grad=True)
    resize_gemm(x, (6, 10)).sum().backward()  # an inference tensor saved for backward would raise
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_cat_reduce_equals_the_grouped_conv_in_values_and_gradients(layout):
    from detector.fast.fpn import FastConcatReduce
    from detector.model.ops import build_aggregation

    torch.manual_seed(0)
    reference = build_aggregation("cat", 8).double()
    nn.init.normal_(reference.reduce[2].weight)
    fast = build_aggregation("cat", 8).double()
    fast.load_state_dict(reference.state_dict())
    fast.__class__ = FastConcatReduce
    results = []
    for module in (reference, fast):
        x = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x = x.to(memory_format=layout).requires_grad_()
        y = y.to(memory_format=layout).requires_grad_()
        out = module(x, y)
        grads = torch.autograd.grad(out, [x, y, *module.parameters()], torch.ones_like(out) * 0.5 + out.detach())
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=layout)


def test_resize_and_cat_reduce_paths_give_the_reference_training_losses():
    torch.manual_seed(0)
    model = build_detector(zoo_arch("nasfcos"), NUM_CLASSES, RECIPES["nasfcos"], "resnet18", width=64,
                           frozen_stages=1, norm="frozen_bn").double().train()
    images = [torch.rand(3, 96, 128, dtype=torch.float64), torch.rand(3, 80, 112, dtype=torch.float64)]
    targets = some_targets()[:2]
    losses = []
    for paths in ((), ("resize", "cat_reduce")):
        set_fast_paths(model, paths)
        torch.manual_seed(0)
        losses.append({k: float(v.detach()) for k, v in model(images, targets).items()})
    assert active_fast_paths(model) == ("resize", "cat_reduce")
    for key in losses[0]:
        assert losses[1][key] == pytest.approx(losses[0][key], rel=1e-10)


def test_self_check_judges_bf16_gradients_against_the_float32_reference():
    from detector.fast.check import check_fast_paths

    model = small_detector("nasfcos", fast=True)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112), torch.rand(3, 64, 64)]
    report = check_fast_paths(model, images, some_targets(), ("fp32", "bf16"))
    bf16 = report["bf16"]
    assert 0 < bf16["reference_bf16_error"] < 0.5 and 0 < bf16["fast_bf16_error"] < 0.5
    within = bf16["grad_rel_diff"] <= 5e-2 or bf16["fast_bf16_error"] <= 1.5 * bf16["reference_bf16_error"]
    assert bf16["ok"] == (within and bf16["max_loss_rel_diff"] <= 1e-2)
    assert report["fp32"]["ok"] and "fast_bf16_error" not in report["fp32"]
