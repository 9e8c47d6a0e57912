"""Building detectors from codes: dispatch, recipe-driven head settings, backbone levels, the
config contract, and 50 random codes + every zoo entry through a training step and an eval pass."""
import dataclasses
import random

import pytest
import torch
from omegaconf import OmegaConf

from detector.model import fcos_head
from detector.model import standard_fpn
from detector.arch.grammar import parse
from detector.model.backbone import ShapeSpec, build_backbone
from detector.model.build import backbone_levels, build_decoder, build_detector, build_detector_from_cfg
from detector.cli import CONF_DIR, compose
from detector.model.fcos import FCOS
from detector.model.recipe import Recipe
from detector.model.searched_fpn import SearchedFPNModule
from detector.model.searched_head import SearchedHeadModule
from detector.arch.zoo import ZOO, zoo_arch
from detector.arch.space import SearchSpace
from torch_threads import single_thread  # noqa: F401  (autouse: one torch thread per module)

NUM_CLASSES = 3
WIDTH = 32
NUM_RANDOM_CODES = 50
SHAPES = {"c3": ShapeSpec(128, 8), "c4": ShapeSpec(256, 16), "c5": ShapeSpec(512, 32)}
C2_CODE = "fpn:c2-c5-sep3-dcn-sum/c3-c4-skip-skip-cat/c2-c2-skip-skip-sum+head:s1-conv3-skip"


def _recipe(name: str, **changes) -> Recipe:
    recipe = Recipe.from_cfg(OmegaConf.load(CONF_DIR / "recipe" / f"{name}.yaml"))
    return dataclasses.replace(recipe, **changes)


def _batch():
    # Two images of different sizes (padded to 96x96 inside FCOS); the second has no objects.
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 72)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def _train_step_and_eval(model: FCOS, label: str) -> None:
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    total = sum(losses.values())
    assert torch.isfinite(total), f"{label}: non-finite losses {losses}"
    total.backward()
    for part in (model.fpn, model.head):
        for name, p in part.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{label}: bad gradient for {name}"
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert boxes.shape[1] == 4 and boxes.shape[0] == scores.shape[0] == labels.shape[0] <= 100
        assert boxes.shape[0] > 0  # score_thresh 0 below: post-processing really runs
        assert torch.isfinite(boxes).all() and (labels >= 0).all() and (labels < NUM_CLASSES).all()
        assert (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all()


# ---------------------------------------------------------------- dispatch
def test_build_decoder_dispatches_on_the_code_parts():
    recipe = _recipe("nasfcos")
    fpn, head = build_decoder(zoo_arch("fcos"), SHAPES, NUM_CLASSES, recipe, WIDTH)
    assert isinstance(fpn, standard_fpn.StandardFPN) and isinstance(head, fcos_head.FCOSHead)
    fpn, head = build_decoder(zoo_arch("nasfcos-fpn"), SHAPES, NUM_CLASSES, recipe, WIDTH)
    assert isinstance(fpn, SearchedFPNModule) and isinstance(head, fcos_head.FCOSHead)
    fpn, head = build_decoder(zoo_arch("nasfcos"), SHAPES, NUM_CLASSES, recipe, WIDTH)
    assert isinstance(fpn, SearchedFPNModule) and isinstance(head, SearchedHeadModule)
    assert str(fpn.code) == str(zoo_arch("nasfcos").fpn) and head.code == zoo_arch("nasfcos").head


@pytest.mark.parametrize("arch_name", ["fcos", "nasfcos"])
@pytest.mark.parametrize("recipe_name", ["nasfcos", "torchvision"])
def test_both_head_kinds_take_box_activation_and_centerness_from_the_recipe(arch_name, recipe_name):
    recipe = _recipe(recipe_name)
    _, head = build_decoder(zoo_arch(arch_name), SHAPES, NUM_CLASSES, recipe, WIDTH)
    assert head.box_activation == recipe.box_activation
    assert head.centerness_on == recipe.centerness_on
    assert (getattr(head, "scales", None) is not None) == (recipe.box_activation == "exp_scale")


def test_without_a_recipe_heads_follow_the_authors():
    _, head = build_decoder(zoo_arch("nasfcos"), SHAPES, NUM_CLASSES, None, WIDTH)
    assert (head.box_activation, head.centerness_on) == ("exp_scale", "cls")


def test_backbone_levels_add_c2_only_when_the_fpn_reads_it():
    assert backbone_levels(zoo_arch("nasfcos")) == ("c3", "c4", "c5")
    assert backbone_levels(zoo_arch("fcos")) == ("c3", "c4", "c5")
    assert backbone_levels(parse(C2_CODE, None, None)) == ("c2", "c3", "c4", "c5")
    assert backbone_levels(zoo_arch("fcos"), ["c2", "c3", "c4", "c5"]) == ("c2", "c3", "c4", "c5")


# ---------------------------------------------------------------- full detectors
@pytest.mark.parametrize("name", list(ZOO))
def test_build_detector_for_every_zoo_entry_trains_and_evaluates(name):
    torch.manual_seed(0)
    recipe = _recipe("nasfcos" if name != "fcos" else "torchvision", score_thresh=0.0)
    model = build_detector(zoo_arch(name), NUM_CLASSES, recipe, "resnet18", width=WIDTH)
    assert isinstance(model, FCOS) and model.backbone.levels == ("c3", "c4", "c5")
    _train_step_and_eval(model, name)


def test_a_code_reading_c2_gets_a_backbone_that_returns_c2():
    torch.manual_seed(0)
    model = build_detector(parse(C2_CODE, None, None), NUM_CLASSES, _recipe("nasfcos", score_thresh=0.0),
                           "resnet18", width=WIDTH)
    assert "c2" in model.backbone.output_shapes() and "c2" in model.fpn.adapters
    _train_step_and_eval(model, "c2 code")


def test_build_detector_from_cfg_reads_the_config_contract():
    cfg = compose("train", ["backbone=resnet18", "backbone.weights=none", "backbone.frozen_stages=2",
                            "recipe=torchvision", "model.width=64", "data=synthetic"])
    model = build_detector_from_cfg(cfg, zoo_arch("nasfcos"))
    assert model.num_classes == cfg.data.num_classes
    assert model.recipe.name == "torchvision" and model.head.box_activation == "relu"
    assert model.fpn.width == 64 and model.backbone.frozen_stages == 2
    assert not any(p.requires_grad for p in model.backbone.layer2.parameters())
    assert any(p.requires_grad for p in model.backbone.layer3.parameters())


@pytest.fixture(scope="module")
def shared_backbone():
    # One random ResNet-18 for all random codes (building it dominates otherwise); fully frozen so a
    # step's backward stays in the decoder, as on cached features.
    return build_backbone("resnet18", weights="none", frozen_stages=4, levels=("c3", "c4", "c5"))


@pytest.mark.parametrize("seed", range(NUM_RANDOM_CODES))
def test_random_codes_build_detectors_that_train_and_evaluate(seed, shared_backbone):
    arch = SearchSpace("joint").sample(random.Random(seed))
    torch.manual_seed(seed)
    # Alternate recipes so both head settings meet both losses.
    recipe = _recipe("torchvision" if seed % 2 else "nasfcos", score_thresh=0.0)
    fpn, head = build_decoder(arch, shared_backbone.output_shapes(), NUM_CLASSES, recipe, WIDTH)
    model = FCOS(shared_backbone, fpn, head, NUM_CLASSES, recipe)
    _train_step_and_eval(model, str(arch))
