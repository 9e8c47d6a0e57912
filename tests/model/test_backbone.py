"""Backbones: declared shapes match real outputs, freezing, caffe layout, weight loading errors."""
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detector.model.backbone import (BACKBONE_NAMES, BackboneError, WeightsError, build_backbone)
from detector.errors import UserError


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_declared_output_shapes_match_forward(name):
    """output_shapes() is known before forward and equals what forward returns, c2 included."""
    torch.manual_seed(0)
    backbone = build_backbone(name, weights="none", levels=("c2", "c3", "c4", "c5")).eval()
    declared = backbone.output_shapes()
    assert list(declared) == ["c2", "c3", "c4", "c5"]
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 96, 128))
    assert list(outputs) == list(declared)
    for level, feature in outputs.items():
        assert feature.shape[1] == declared[level].channels, level
        assert (96 // feature.shape[2], 128 // feature.shape[3]) == (declared[level].stride,) * 2, level


def test_levels_subset_drops_unused_stages():
    """Asking only for c3 keeps the network up to stage 2 and returns only c3."""
    backbone = build_backbone("resnet18", levels=("c3",))
    assert not hasattr(backbone, "layer3")
    assert list(backbone(torch.randn(1, 3, 64, 64))) == ["c3"]


def test_default_freezes_stem_and_first_stage_with_frozen_bn():
    backbone = build_backbone("resnet18")
    assert not any(p.requires_grad for p in backbone.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    norms = [m for m in backbone.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)


@pytest.mark.parametrize("frozen_stages, trainable", [(-1, ["conv1", "layer1", "layer4"]),
                                                      (0, ["layer1", "layer4"]),
                                                      (4, [])])
def test_frozen_stages_setting(frozen_stages, trainable):
    backbone = build_backbone("resnet18", frozen_stages=frozen_stages)
    for name in ["conv1", "layer1", "layer2", "layer3", "layer4"]:
        grads = {p.requires_grad for p in getattr(backbone, name).parameters()}
        assert grads == {name in trainable or (name in ("layer2", "layer3") and frozen_stages < 2)}, name


def test_mobilenet_frozen_stages_cover_stem_and_stride4_blocks():
    backbone = build_backbone("mobilenet_v2", frozen_stages=1)
    for index, block in enumerate(backbone.features):
        assert all(p.requires_grad == (index >= 4) for p in block.parameters()), index


def test_plain_bn_in_frozen_stages_stays_in_eval_mode():
    """norm=bn: the frozen stem/stage-1 BatchNorms keep their statistics during training."""
    backbone = build_backbone("resnet18", norm="bn").train()
    assert isinstance(backbone.bn1, nn.BatchNorm2d)
    assert not backbone.bn1.training and not backbone.layer1[0].bn1.training
    assert backbone.layer2[0].bn1.training


def test_caffe_resnet50_strides_on_the_1x1_and_takes_bgr255():
    caffe, plain = build_backbone("resnet50_caffe"), build_backbone("resnet50")
    for stage in ("layer2", "layer3", "layer4"):
        first = getattr(caffe, stage)[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        first = getattr(plain, stage)[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert caffe.input_format == "bgr255" and caffe.pixel_std == (1.0, 1.0, 1.0)
    assert caffe.pixel_mean[0] > 100  # BGR means in 0..255
    assert plain.input_format == "rgb01"


def test_imagenet_weights_offline_raise_clear_error(monkeypatch):
    """No network: the torchvision download fails and the user is told how to pass a local file."""
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"backbone\.weights=/path/to/file\.pth") as info:
        build_backbone("resnet18", weights="imagenet")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_caffe_imagenet_weights_explain_that_a_file_is_needed():
    with pytest.raises(WeightsError, match="torchvision has no ImageNet weights"):
        build_backbone("resnet50_caffe", weights="imagenet")


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"model": source.state_dict()}, path)  # wrapped dicts are unwrapped
    backbone = build_backbone("resnet18", weights=str(path))
    assert torch.equal(backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, source.bn1.running_var)


def test_bad_weights_files_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="no file at"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        build_backbone("resnet18", weights=str(wrong))


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "resnet9"}, "unknown name"),
    ({"name": "resnet18", "norm": "gn"}, "unknown norm"),
    ({"name": "resnet18", "frozen_stages": 7}, "frozen_stages"),
    ({"name": "resnet18", "levels": ("c3", "c6")}, "levels"),
])
def test_bad_arguments_raise_backbone_error(kwargs, message):
    with pytest.raises(BackboneError, match=message):
        build_backbone(**kwargs)
