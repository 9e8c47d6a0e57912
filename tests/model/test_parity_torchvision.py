"""Parity with torchvision's FCOS: arch=fcos recipe=torchvision backbone=resnet50 is the same model.

A randomly initialised torchvision ``fcos_resnet50_fpn`` is converted into our detector; on the same
batch (two sizes, one image without boxes) losses and detections must agree. torchvision resizes
internally, so it is built with min_size=max_size=256 and both images have a 256 long side, which
makes its resize the identity (checked). Its backbone uses plain BatchNorm when built without
weights; it is calibrated once and put in eval mode, which our FrozenBatchNorm2d computes.
"""
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from detector.model.backbone import build_backbone
from detector.model.convert import ConversionError, torchvision_fcos_to_ours
from detector.model.fcos import FCOS
from detector.model.fcos_head import FCOSHead
from detector.model.recipe import Recipe
from detector.model.standard_fpn import StandardFPN

NUM_CLASSES = 5
RECIPE = Recipe.from_cfg(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/recipe/torchvision.yaml"))


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=256, max_size=256,
        score_thresh=RECIPE.score_thresh, nms_thresh=RECIPE.nms_thresh,
        detections_per_img=RECIPE.detections_per_image, topk_candidates=RECIPE.topk_per_level)
    with torch.no_grad():
        # realistic BatchNorm statistics: one training-mode pass with momentum None (= plain average)
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        theirs.backbone.train()(torch.randn(4, 3, 128, 128))
        # spread the scores and give boxes a few strides of size, so detections are not all ties
        theirs.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        theirs.head.regression_head.bbox_ctrness.weight.normal_(0, 0.05)
        theirs.head.regression_head.bbox_reg.bias.fill_(3.0)
    backbone = build_backbone("resnet50", weights="none")
    head = FCOSHead(256, NUM_CLASSES, centerness_on=RECIPE.centerness_on, box_activation=RECIPE.box_activation)
    ours = FCOS(backbone, StandardFPN(backbone.output_shapes(), width=256), head, NUM_CLASSES, RECIPE)
    ours.load_state_dict(torchvision_fcos_to_ours(theirs.state_dict()), strict=True)
    return theirs, ours


def batch():
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 200, 256, generator=generator), torch.rand(3, 256, 160, generator=generator)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [50.0, 60.0, 90.0, 100.0], [0.0, 0.0, 250.0, 199.0],
                                [140.0, 30.0, 160.0, 44.0]]),
         "labels": torch.tensor([1, 3, 0, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def set_train_mode(theirs, ours):
    theirs.train()
    for module in theirs.modules():  # batch statistics would differ from frozen ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    ours.train()


def test_fpn_and_head_have_torchvision_parameter_counts(models):
    theirs, ours = models
    assert count(ours.fpn) == count(theirs.backbone.fpn)
    assert count(ours.head) == count(theirs.head)
    # their backbone has BatchNorm affine parameters; our FrozenBatchNorm2d keeps them as buffers
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in theirs.modules()
                    if isinstance(m, torch.nn.BatchNorm2d))
    assert count(ours.backbone) + bn_affine == count(theirs.backbone.body)


def test_torchvision_transform_is_identity_and_matches_our_preprocessing(models):
    theirs, ours = models
    images, _ = batch()
    theirs.eval()
    transformed, _ = theirs.transform(images)
    padded, sizes = ours.preprocess(images)
    assert transformed.image_sizes == sizes == [(200, 256), (256, 160)]
    assert torch.equal(transformed.tensors, padded)


def test_losses_match(models):
    theirs, ours = models
    images, targets = batch()
    set_train_mode(theirs, ours)
    expected = theirs(images, targets)
    found = ours(images, targets)
    assert set(found) == set(expected)
    for name in expected:
        assert found[name].item() == pytest.approx(expected[name].item(), rel=1e-4), name
    assert expected["bbox_regression"] > 0  # positives exist, so the box terms are really compared


def test_detections_match(models):
    theirs, ours = models
    images, _ = batch()
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected, found = theirs(images), ours(images)
    for image_expected, image_found in zip(expected, found):
        assert len(image_expected["boxes"]) > 10
        assert torch.equal(image_found["labels"], image_expected["labels"])
        torch.testing.assert_close(image_found["boxes"], image_expected["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(image_found["scores"], image_expected["scores"], atol=1e-4, rtol=0)


def test_converter_rejects_foreign_keys():
    with pytest.raises(ConversionError, match="roi_heads.box_head"):
        torchvision_fcos_to_ours({"roi_heads.box_head.fc6.weight": torch.zeros(1)})
