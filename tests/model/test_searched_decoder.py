"""Searched FPN and head modules: the published decoder's wiring, the output rules, sharing,
predictor initialisation, and random codes + every zoo entry through forward and backward."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from detector.arch.grammar import OutputPlan, SearchedHead, parse
from detector.model.backbone import ShapeSpec
from detector.model.build import build_decoder
from detector.model.deform import ModulatedDeformConv
from detector.errors import UserError
from detector.model.searched_fpn import SearchedFPNModule
from detector.model.searched_head import SearchedHeadModule
from detector.arch.zoo import ZOO, zoo_arch
from detector.arch.space import SearchSpace
from torch_threads import single_thread  # noqa: F401  (autouse: one torch thread per module)

WIDTH = 32
NUM_CLASSES = 3
SHAPES = {"c3": ShapeSpec(24, 8), "c4": ShapeSpec(40, 16), "c5": ShapeSpec(56, 32)}
# tests/model/test_build.py runs 50 random codes through full detectors; these 10 other seeds add
# decoder-only coverage at the search's working point (cached features, no backbone).
RANDOM_SEEDS = range(100, 110)


def _features(batch=2, height=64, width=96, shapes=SHAPES):
    # Backbone-like features of a (height, width) image: level l at stride s_l, rounded up.
    return {
        level: torch.randn(batch, spec.channels, math.ceil(height / spec.stride), math.ceil(width / spec.stride))
        for level, spec in shapes.items()
    }


def _capture_cell_outputs(fpn):
    outputs = {}
    for k, cell in enumerate(fpn.cells):
        cell.register_forward_hook(lambda module, args, out, k=k: outputs.__setitem__(k, out))
    return outputs


def _resize(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- the published FPN
def test_nasfcos_fpn_decodes_to_the_published_output_plan():
    fpn_code = zoo_arch("nasfcos").fpn
    assert fpn_code.outputs() == OutputPlan(p5=4, p4=5, p3=6, extras=(2,))
    strides = fpn_code.strides()
    assert (strides[4], strides[2]) == (32, 32)  # P5 = B4 + B2, both at stride 32
    assert strides[5] == 8 and strides[6] == 8  # P4 is computed at stride 8, P3 too
    fpn = SearchedFPNModule(fpn_code, SHAPES, WIDTH)
    assert sum(isinstance(m, ModulatedDeformConv) for m in fpn.modules()) == 12


def test_nasfcos_fpn_outputs_are_the_documented_sums_and_resizes():
    fpn = SearchedFPNModule(zoo_arch("nasfcos").fpn, SHAPES, WIDTH).eval()
    feats = _features(batch=1)
    cells = _capture_cell_outputs(fpn)
    with torch.no_grad():
        p3, p4, p5, p6, p7 = fpn(feats)
    b2, b4, b5, b6 = cells[2], cells[4], cells[5], cells[6]
    assert b5.shape[-2:] == feats["c3"].shape[-2:]  # B5 lives at stride 8
    torch.testing.assert_close(p5, b4 + b2)  # same size as C5: no resize
    torch.testing.assert_close(p4, _resize(b5 + _resize(b2, b5), feats["c4"]))  # downsampled to C4
    torch.testing.assert_close(p3, b6 + _resize(b2, b6))
    torch.testing.assert_close(p6, fpn.p6(p5))
    torch.testing.assert_close(p7, fpn.p7(F.relu(p6)))


def test_fpn_levels_have_the_backbone_sizes_and_p6_p7_halve_them():
    fpn = SearchedFPNModule(zoo_arch("nasfcos").fpn, SHAPES, WIDTH)
    feats = _features(height=100, width=76)  # odd sizes: 13x10, 7x5, 4x3
    pyramid = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in pyramid[:3]] == [tuple(feats[lv].shape[-2:]) for lv in ("c3", "c4", "c5")]
    assert tuple(pyramid[3].shape[-2:]) == (2, 2) and tuple(pyramid[4].shape[-2:]) == (1, 1)
    assert all(p.shape[:2] == (2, WIDTH) for p in pyramid)


def test_p6_p7_are_stride_2_convs_with_bias_and_no_norm():
    fpn = SearchedFPNModule(zoo_arch("nasfcos").fpn, SHAPES, WIDTH)
    for conv in (fpn.p6, fpn.p7):
        assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.bias is not None
        assert conv.bias.abs().sum() == 0


def test_adapters_are_built_only_for_levels_read_and_are_conv_bn_relu():
    code = parse("fpn:c5-c4-sep3-skip-sum/c4-c5-skip-sep3-cat/c5-c5-skip-skip-sum+head:fcos", num_blocks=None)
    fpn = SearchedFPNModule(code.fpn, SHAPES, WIDTH)
    assert set(fpn.adapters) == {"c4", "c5"}
    conv, bn, relu = fpn.adapters["c4"]
    assert conv.in_channels == 40 and conv.out_channels == WIDTH and conv.kernel_size == (1, 1)
    assert conv.bias is None and isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    pyramid = fpn(_features())
    assert tuple(pyramid[0].shape[-2:]) == (8, 12)  # P3 is resized to C3's size although no block reads c3


def test_c2_in_the_pool_is_read_when_the_code_asks_for_it():
    shapes = {"c2": ShapeSpec(16, 4), **SHAPES}
    code = parse("fpn:c2-c5-sep3-dcn-sum/c3-c4-skip-skip-cat/c2-c2-skip-skip-sum+head:fcos", num_blocks=None)
    fpn = SearchedFPNModule(code.fpn, shapes, WIDTH)
    assert set(fpn.adapters) == {"c2", "c3", "c4", "c5"}
    cells = _capture_cell_outputs(fpn)
    pyramid = fpn(_features(shapes=shapes))
    assert tuple(cells[0].shape[-2:]) == (16, 24)  # c2 + c5 -> stride 4
    assert tuple(pyramid[0].shape[-2:]) == (8, 12)  # P3 = resize_to_C3(b2): a downsample


def test_a_level_missing_from_the_backbone_is_refused_at_construction():
    code = parse("fpn:c2-c5-sep3-dcn-sum/c3-c4-skip-skip-cat/c5-c5-skip-skip-sum+head:fcos", num_blocks=None)
    with pytest.raises(UserError, match="needs backbone level.*c2"):
        SearchedFPNModule(code.fpn, SHAPES, WIDTH)


# ---------------------------------------------------------------- the searched head
def _pyramid(batch=2, sizes=((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))):
    return [torch.randn(batch, WIDTH, h, w) for h, w in sizes]


@pytest.mark.parametrize("share", [0, 2, 6])
def test_head_share_index_makes_the_first_k_layers_per_level(share):
    code = SearchedHead(share, ("conv3", "conv1", "sep3", "dcn", "skip", "sep3d3"))
    head = SearchedHeadModule(code, WIDTH, NUM_CLASSES)
    for tower in (head.cls_tower, head.reg_tower):
        assert len(tower.shared) == 6 - share
        if share:
            assert len(tower.per_level) == 5 and all(len(chain) == share for chain in tower.per_level)
            first = [chain[0][0].weight for chain in tower.per_level]
            assert all(w is not first[0] and torch.equal(w, first[0]) for w in first[1:])  # copies, equal at init
        else:
            assert tower.per_level is None
    # separate cls and reg weights
    cls_params = {id(p) for p in head.cls_tower.parameters()}
    assert cls_params.isdisjoint(id(p) for p in head.reg_tower.parameters())


def test_head_predictors_follow_the_authors_initialisation():
    head = SearchedHeadModule(zoo_arch("nasfcos").head, WIDTH, NUM_CLASSES)
    for conv, out in ((head.cls_logits, NUM_CLASSES), (head.bbox_pred, 4), (head.centerness, 1)):
        assert conv.kernel_size == (3, 3) and conv.out_channels == out
        assert abs(conv.weight.std().item() - 0.01) < 0.003
    assert torch.allclose(head.cls_logits.bias, torch.full((NUM_CLASSES,), -math.log(99)))
    assert head.bbox_pred.bias.abs().sum() == 0 and head.centerness.bias.abs().sum() == 0
    assert torch.equal(head.scales.detach(), torch.ones(5))


def test_head_outputs_per_level_maps_with_exp_scaled_boxes_and_cls_tower_centerness():
    head = SearchedHeadModule(zoo_arch("nasfcos").head, WIDTH, NUM_CLASSES).eval()
    feats = _pyramid()
    with torch.no_grad():
        out = head(feats)
        for level, feat in enumerate(feats):
            assert out["cls_logits"][level].shape == (2, NUM_CLASSES, *feat.shape[-2:])
            assert out["centerness"][level].shape == (2, 1, *feat.shape[-2:])
            raw = head.bbox_pred(head.reg_tower(feat, level))
            torch.testing.assert_close(out["bbox_reg"][level], torch.exp(head.scales[level] * raw))
            torch.testing.assert_close(out["centerness"][level], head.centerness(head.cls_tower(feat, level)))


def test_head_follows_the_torchvision_recipe_settings_when_asked():
    head = SearchedHeadModule(zoo_arch("nasfcos").head, WIDTH, NUM_CLASSES, box_activation="relu",
                              centerness_on="reg").eval()
    assert head.scales is None
    feat = _pyramid()
    with torch.no_grad():
        out = head(feat)
        assert all((box >= 0).all() for box in out["bbox_reg"])
        torch.testing.assert_close(out["centerness"][1], head.centerness(head.reg_tower(feat[1], 1)))


def test_head_refuses_widths_that_group_norm_cannot_split():
    with pytest.raises(ValueError, match="divisible by 32"):
        SearchedHeadModule(zoo_arch("nasfcos").head, 48, NUM_CLASSES)


# ---------------------------------------------------------------- random codes
def _codes():
    space = SearchSpace("joint")
    zoo = [pytest.param(zoo_arch(name), id=name) for name in ZOO]
    sampled = [pytest.param(space.sample(random.Random(seed)), id=f"random{seed}") for seed in RANDOM_SEEDS]
    return zoo + sampled


@pytest.mark.parametrize("arch", _codes())
def test_decoder_of_every_zoo_entry_and_random_code_runs_forward_and_backward(arch):
    torch.manual_seed(0)
    fpn, head = build_decoder(arch, SHAPES, NUM_CLASSES, recipe=None, width=WIDTH)
    feats = _features()
    pyramid = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    out = head(pyramid)
    loss = sum(t.float().mean() for maps in out.values() for t in maps)
    assert torch.isfinite(loss)
    loss.backward()
    for module in (fpn, head):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{arch}: bad gradient for {name}"
