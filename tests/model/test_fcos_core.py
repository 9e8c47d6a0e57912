"""FCOS core: recipes, points, target assignment, losses, post-processing, head, FPN, detector."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from omegaconf import OmegaConf

from detector.model.backbone import ShapeSpec, build_backbone
from detector.model.fcos import FCOS
from detector.model.fcos_head import FCOSHead
from detector.model.loss import compute_losses, iou_loss, reduce_num_positives
from detector.model.points import make_points
from detector.model.postprocess import postprocess
from detector.model.recipe import Recipe, RecipeError
from detector.model.standard_fpn import StandardFPN
from detector.model.targets import assign_targets, encode_distances

CONF = Path(__file__).resolve().parents[2] / "conf" / "recipe"
SIZES_128 = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # P3..P7 of a 128x128 image


def load_recipe(name: str) -> Recipe:
    return Recipe.from_cfg(OmegaConf.load(CONF / f"{name}.yaml"))


NASFCOS, TORCHVISION = load_recipe("nasfcos"), load_recipe("torchvision")


def target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.int64) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels}


def positives(recipe, boxes, sizes=SIZES_128):
    """Assign one image; return {(level, x, y): matched box index} of its positive points."""
    points = make_points(sizes, recipe.point_offset)
    matched = assign_targets(points, [target(boxes)], recipe).matched[0]  # (P,)
    return {(int(points.levels[i]), float(points.xy[i, 0]), float(points.xy[i, 1])): int(matched[i])
            for i in torch.nonzero(matched >= 0)[:, 0]}


# --- recipes -----------------------------------------------------------------------------------

def test_recipes_load_and_differ_as_documented():
    assert NASFCOS.center_sampling_radius is None and TORCHVISION.center_sampling_radius == 1.5
    assert (NASFCOS.box_loss, TORCHVISION.box_loss) == ("iou", "giou")
    assert (NASFCOS.centerness_on, TORCHVISION.centerness_on) == ("cls", "reg")
    assert NASFCOS.size_ranges[-1] == (512.0, math.inf)
    # torchvision: 4x..8x the anchor size 8 * 2**level, open at both ends
    expected = [(4.0 * 8 * 2**i, 8.0 * 8 * 2**i) for i in range(5)]
    expected[0], expected[-1] = (0.0, 64.0), (512.0, math.inf)
    assert list(TORCHVISION.size_ranges) == expected
    assert hash(NASFCOS) != hash(TORCHVISION)


def test_recipe_rejects_bad_fields():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "nasfcos.yaml"))
    with pytest.raises(RecipeError, match="box_loss"):
        Recipe.from_cfg({**cfg, "box_loss": "l1"})
    with pytest.raises(RecipeError, match="one \\[low, high\\] per pyramid level"):
        Recipe.from_cfg({**cfg, "size_ranges": [[0, 64], [64, 1e8]]})
    with pytest.raises(RecipeError, match="unknown fields"):
        Recipe.from_cfg({**cfg, "extra": 1})


# --- points and targets ------------------------------------------------------------------------

def test_points_are_row_major_with_recipe_offset():
    fcos_points = make_points([(2, 3)], offset=0.5, strides=(8,))
    assert fcos_points.xy.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert make_points([(1, 2)], offset=0.0, strides=(16,)).xy.tolist() == [[0, 0], [16, 0]]


def test_points_strictly_inside_a_small_box_go_to_p3():
    # box 30x30 at the origin: P3 points (4 + 8k) with x, y <= 28 are inside, max distance 26 <= 64;
    # P4 points (8, 24) are inside too but their max distance 22 is below P4's range [64, 128].
    found = positives(NASFCOS, [[0, 0, 30, 30]])
    assert set(found) == {(0, float(x), float(y)) for x in (4, 12, 20, 28) for y in (4, 12, 20, 28)}


def test_size_ranges_pick_the_level_by_largest_distance():
    # box 100x100: on P3 only points whose four distances are all <= 64, i.e. x, y in [36, 64];
    # on P4 the remaining inside points (max distance in [64, 128]); nothing on P5..P7.
    found = positives(NASFCOS, [[0, 0, 100, 100]])
    p3 = {(x, y) for (level, x, y) in found if level == 0}
    p4 = {(x, y) for (level, x, y) in found if level == 1}
    assert p3 == {(float(x), float(y)) for x in (36, 44, 52, 60) for y in (36, 44, 52, 60)}
    assert len(p4) == 6 * 6 - 4  # 6x6 P4 points inside, minus (40|56, 40|56) whose max is < 64
    assert all(level <= 1 for level, _, _ in found)


def test_range_bounds_inclusive_for_fcos_exclusive_for_torchvision():
    # point (64, 64) in box (0, 0, 128, 128) has max distance exactly 64: the P3/P4 boundary.
    no_sampling = dataclasses.replace(TORCHVISION, center_sampling_radius=None)
    inclusive = dataclasses.replace(no_sampling, size_range_inclusive=True)
    exclusive = positives(no_sampling, [[0, 0, 128, 128]])
    assert (0, 64.0, 64.0) not in exclusive and (1, 64.0, 64.0) not in exclusive
    found = positives(inclusive, [[0, 0, 128, 128]])
    assert (0, 64.0, 64.0) in found and (1, 64.0, 64.0) in found


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_smallest_area_box_wins(order):
    boxes = [[0, 0, 60, 60], [20, 20, 40, 40]]  # big, small; (28, 28) is inside both
    boxes = [boxes[i] for i in order]
    small_index = order.index(1)
    found = positives(NASFCOS, boxes)
    assert found[(0, 28.0, 28.0)] == small_index
    assert found[(0, 4.0, 4.0)] == 1 - small_index  # only inside the big box


def test_center_sampling_keeps_points_near_the_box_center():
    # torchvision: P3 points at multiples of 8; box center (30, 30), radius 1.5 * 8 = 12 -> x, y in
    # {24, 32, 40}. P4 points near the center have max distance < 64, outside P4's range.
    found = positives(TORCHVISION, [[0, 0, 60, 60]])
    assert set(found) == {(0, float(x), float(y)) for x in (24, 32, 40) for y in (24, 32, 40)}
    assert len(positives(dataclasses.replace(TORCHVISION, center_sampling_radius=None),
                         [[0, 0, 60, 60]])) > 9


def test_batched_assignment_pads_boxes_per_image():
    points = make_points(SIZES_128, NASFCOS.point_offset)
    batch = [target([[0, 0, 30, 30], [60, 60, 100, 90]], [3, 1]), target([]), target([[0, 0, 30, 30]], [2])]
    assigned = assign_targets(points, batch, NASFCOS)
    assert assigned.matched.shape == (3, points.xy.shape[0])
    assert (assigned.matched[1] == -1).all() and (assigned.labels[1] == -1).all()
    assert set(assigned.labels[0].unique().tolist()) == {-1, 1, 3}
    assert set(assigned.labels[2].unique().tolist()) == {-1, 2}
    # image 2 has image 0's first box: same positives
    assert torch.equal(assigned.matched[2] == 0, assigned.matched[0] == 0)
    fg = assigned.foreground[0]
    assert torch.equal(assigned.boxes[0, fg & (assigned.matched[0] == 1)][0], torch.tensor([60., 60, 100, 90]))


# --- losses ------------------------------------------------------------------------------------

def test_iou_loss_values():
    same = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    assert iou_loss(same, same).abs().item() < 1e-7
    # pred 2x2, target 4x4 around the same point: intersection 4, union 16, +1 smoothing
    value = iou_loss(torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[2.0, 2, 2, 2]]))
    assert value.item() == pytest.approx(-math.log(5 / 17))


@pytest.mark.parametrize("recipe", [NASFCOS, TORCHVISION], ids=["nasfcos", "torchvision"])
def test_losses_on_head_outputs_alone_vanish_for_a_perfect_prediction(recipe):
    """compute_losses works without a model; predicting the assigned targets gives ~zero box loss."""
    points = make_points(SIZES_128, recipe.point_offset)
    targets = [target([[0, 0, 30, 30], [40, 8, 120, 100]], [1, 0])]
    assigned = assign_targets(points, targets, recipe)
    fg = assigned.foreground[0]  # (P,)
    distances = encode_distances(points, assigned.boxes[0])  # (P, 4) pixels
    if recipe.box_coding == "linear_by_size":
        distances = distances / points.strides[:, None]
    logits = torch.full((points.xy.shape[0], 2), -12.0)  # (P, C)
    logits[fg, assigned.labels[0, fg]] = 12.0

    def per_level(flat):  # (P, K) -> [(1, K, H, W)]
        return [t.t().reshape(1, -1, h, w) for t, (h, w) in zip(flat.split(points.num_per_level), SIZES_128)]

    head_out = {"cls_logits": per_level(logits), "bbox_reg": per_level(torch.where(fg[:, None], distances, 1.0)),
                "centerness": per_level(torch.zeros(points.xy.shape[0], 1))}
    losses = compute_losses(head_out, points, targets, recipe, num_classes=2)
    assert fg.sum() > 10
    assert losses["bbox_regression"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["classification"].item() < 1e-4
    assert losses["bbox_ctrness"].item() > 0.3  # logit 0 against centerness targets in (0, 1]


def small_detector(recipe, num_classes=3):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    head = FCOSHead(64, num_classes, centerness_on=recipe.centerness_on, box_activation=recipe.box_activation)
    return FCOS(backbone, StandardFPN(backbone.output_shapes(), width=64), head, num_classes, recipe)


@pytest.mark.parametrize("recipe", [NASFCOS, TORCHVISION], ids=["nasfcos", "torchvision"])
def test_image_without_boxes_gives_finite_losses_and_zero_box_losses(recipe):
    model = small_detector(recipe).train()
    losses = model([torch.rand(3, 128, 96)], [target([])])
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["classification"] > 0
    assert losses["bbox_regression"] == 0 and losses["bbox_ctrness"] == 0
    sum(losses.values()).backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe", [NASFCOS, TORCHVISION], ids=["nasfcos", "torchvision"])
def test_training_step_with_boxes_reduces_loss(recipe):
    model = small_detector(recipe).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [target([[10, 10, 70, 90], [80, 20, 120, 60]], [0, 2]), target([])]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(4):
        losses = model(images, targets)
        assert all(v > 0 for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < totals[0]


def _average_in_process(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = reduce_num_positives(torch.tensor(float(2 + 4 * rank))).item()
    finally:
        dist.destroy_process_group()


def test_reduce_num_positives_averages_across_processes(tmp_path):
    assert reduce_num_positives(torch.tensor(7)).item() == 7.0  # single process: unchanged
    results = mp.Manager().dict()
    # fork: no re-import of torch in the children (spawn costs ~10 s on a busy 2-core machine)
    mp.start_processes(_average_in_process, args=(2, str(tmp_path / "init"), results), nprocs=2,
                       start_method="fork")
    assert dict(results) == {0: 4.0, 1: 4.0}  # (2 + 6) / 2 on both ranks


# --- post-processing ---------------------------------------------------------------------------

def one_hot_head_out(recipe, num_classes=2, sizes=((4, 4), (2, 2), (1, 1), (1, 1), (1, 1))):
    """All points background (logit -10) except P3 cell (1, 2) predicting class 1."""
    head_out = {"cls_logits": [torch.full((1, num_classes, h, w), -10.0) for h, w in sizes],
                "bbox_reg": [torch.ones(1, 4, h, w) for h, w in sizes],
                "centerness": [torch.zeros(1, 1, h, w) for h, w in sizes]}
    head_out["cls_logits"][0][0, 1, 1, 2] = 2.0
    head_out["bbox_reg"][0][0, :, 1, 2] = torch.tensor([1.0, 2.0, 3.0, 40.0])
    return head_out, make_points(list(sizes), recipe.point_offset)


@pytest.mark.parametrize("recipe", [NASFCOS, TORCHVISION], ids=["nasfcos", "torchvision"])
def test_postprocess_decodes_scores_and_clips(recipe):
    head_out, points = one_hot_head_out(recipe)
    [found] = postprocess(head_out, points, [(30, 32)], recipe)
    assert found["labels"].tolist() == [1]
    probability = torch.sigmoid(torch.tensor(2.0)) * 0.5  # sigmoid(cls) * sigmoid(0)
    expected_score = probability if recipe.score_formula == "product" else probability.sqrt()
    assert found["scores"].item() == pytest.approx(expected_score.item())
    x, y = (2 + recipe.point_offset) * 8, (1 + recipe.point_offset) * 8
    unit = 8.0 if recipe.box_coding == "linear_by_size" else 1.0
    expected = [max(x - 1 * unit, 0), max(y - 2 * unit, 0), min(x + 3 * unit, 32), min(y + 40 * unit, 30)]
    assert found["boxes"][0].tolist() == pytest.approx(expected)


def test_threshold_applies_to_class_probability_or_score():
    # sigmoid(cls) = 0.1 passes 0.05; the product with sigmoid(-3) = 0.047 is 0.0047 and does not.
    head_out, points = one_hot_head_out(NASFCOS)
    head_out["cls_logits"][0][0, 1, 1, 2] = math.log(0.1 / 0.9)
    head_out["centerness"][0][0, 0, 1, 2] = -3.0
    assert len(postprocess(head_out, points, [(64, 64)], NASFCOS)[0]["boxes"]) == 1
    on_score = dataclasses.replace(NASFCOS, threshold_on="score")
    assert len(postprocess(head_out, points, [(64, 64)], on_score)[0]["boxes"]) == 0


def test_postprocess_suppresses_overlaps_and_caps_detections():
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    head_out = {"cls_logits": [torch.zeros(1, 1, h, w) for h, w in sizes],
                "bbox_reg": [torch.full((1, 4, h, w), 20.0) for h, w in sizes],
                "centerness": [torch.zeros(1, 1, h, w) for h, w in sizes]}
    points = make_points(sizes, NASFCOS.point_offset)
    [dense] = postprocess(head_out, points, [(64, 64)], NASFCOS)
    [capped] = postprocess(head_out, points, [(64, 64)], dataclasses.replace(NASFCOS, detections_per_image=2))
    assert 1 <= len(dense["boxes"]) < points.xy.shape[0]  # NMS removed heavily overlapping boxes
    assert len(torchvision.ops.box_iou(dense["boxes"], dense["boxes"]).triu(1).gt(0.6).nonzero()) == 0
    assert len(capped["boxes"]) == 2


# --- head, FPN, detector -----------------------------------------------------------------------

def test_fcos_head_shapes_and_recipe_variants():
    features = [torch.randn(2, 64, s, s) for s in (16, 8, 4, 2, 1)]
    head = FCOSHead(64, 7, centerness_on="cls", box_activation="exp_scale")
    out = head(features)
    for key, channels in (("cls_logits", 7), ("bbox_reg", 4), ("centerness", 1)):
        assert [tuple(t.shape) for t in out[key]] == [(2, channels, s, s) for s in (16, 8, 4, 2, 1)]
    assert all((t > 0).all() for t in out["bbox_reg"])
    relu_head = FCOSHead(64, 7, centerness_on="reg", box_activation="relu")
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in relu_head.parameters()) + 5
    # centerness from the cls tower ignores the regression tower, and vice versa
    with torch.no_grad():
        before = head(features)["centerness"][0].clone()
        head.reg_tower[0].weight.add_(1.0)
        assert torch.equal(head(features)["centerness"][0], before)
        before = relu_head(features)["centerness"][0].clone()
        relu_head.reg_tower[0].weight.add_(1.0)
        assert not torch.equal(relu_head(features)["centerness"][0], before)


def test_standard_fpn_outputs_p3_to_p7_and_needs_c3_to_c5():
    shapes = {"c3": ShapeSpec(32, 8), "c4": ShapeSpec(48, 16), "c5": ShapeSpec(64, 32)}
    fpn = StandardFPN(shapes, width=32)
    features = {"c3": torch.randn(1, 32, 25, 32), "c4": torch.randn(1, 48, 13, 16), "c5": torch.randn(1, 64, 7, 8)}
    assert [tuple(p.shape[-2:]) for p in fpn(features)] == [(25, 32), (13, 16), (7, 8), (4, 4), (2, 2)]
    assert [s.stride for s in fpn.output_shapes()] == [8, 16, 32, 64, 128]
    with pytest.raises(ValueError, match="missing"):
        StandardFPN({"c4": ShapeSpec(48, 16), "c5": ShapeSpec(64, 32)})


def test_eval_detections_are_inside_each_image():
    model = small_detector(NASFCOS).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.zero_()  # the 0.01 prior is below score_thresh: nothing would pass
        detections = model([torch.rand(3, 100, 120), torch.rand(3, 64, 80)])
    for found, (height, width) in zip(detections, [(100, 120), (64, 80)]):
        assert set(found) == {"boxes", "scores", "labels"}
        assert 0 < len(found["boxes"]) <= 100
        assert (found["boxes"][:, 0::2] <= width).all() and (found["boxes"][:, 1::2] <= height).all()
        assert (found["boxes"] >= 0).all() and found["labels"].max() < 3


def test_caffe_backbone_gets_bgr255_mean_subtracted_input():
    backbone = build_backbone("resnet50_caffe", levels=("c3", "c4", "c5"))
    model = FCOS(backbone, StandardFPN(backbone.output_shapes(), 32), FCOSHead(32, 2), 2, NASFCOS)
    image = torch.zeros(3, 2, 2)
    image[0] = 1.0  # pure red
    normalized = model.normalize(image)
    assert normalized[:, 0, 0].tolist() == pytest.approx([-103.53, -116.28, 255.0 - 123.675])


def test_degenerate_target_box_is_rejected():
    model = small_detector(NASFCOS).train()
    with pytest.raises(ValueError, match="no area"):
        model([torch.rand(3, 64, 64)], [target([[10, 10, 10, 30]])])
