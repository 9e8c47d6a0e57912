"""timm backbones and EfficientNet-Lite with the packaged ImageNet weights (no test downloads).

The weights check classifies real photographs that ship with scikit-image (a cat and a cup of
espresso): wrongly mapped tensors, a wrong padding or a wrong input normalisation all break it.
"""
import numpy as np
import pytest
import skimage.data as skimage_data  # the test extra: real photographs shipped in the package
import timm
import torch
from huggingface_hub import constants as hub_constants
from torch import nn

from detector.model.backbone import BackboneError, WeightsError, build_backbone, resolve_freezing
from detector.errors import UserError
from detector.model.timm_backbone import efficientnet_lite_state_dict

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _imagenet_batch(images: list[np.ndarray], size: int = 224) -> torch.Tensor:
    """HWC uint8 photos -> (N, 3, size, size), whole photo resized, mean = std = 0.5 (TF EfficientNet-Lite)."""
    batch = []
    for image in images:
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch.append((x[0] - 0.5) / 0.5)
    return torch.stack(batch)


def test_packaged_lite0_weights_classify_real_photos():
    """Renamed package tensors in timm's tf_efficientnet_lite0: chelsea is a cat, coffee an espresso."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite_state_dict("efficientnet_lite0"))  # strict: every key fits
    with torch.no_grad():
        probabilities = model.eval()(_imagenet_batch([skimage_data.chelsea(), skimage_data.coffee()])).softmax(1)
    assert probabilities.argmax(1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert probabilities[0, EGYPTIAN_CAT] > 0.7 and probabilities[1, ESPRESSO] > 0.7


def test_lite0_imagenet_backbone_levels_and_weights():
    """C3/C4/C5 = 40/112/320 channels at strides 8/16/32, with the packaged weights, declared before forward."""
    backbone = build_backbone("efficientnet_lite0", weights="imagenet", frozen_stages="auto", norm="auto").eval()
    declared = backbone.output_shapes()
    assert {k: (v.channels, v.stride) for k, v in declared.items()} == {"c3": (40, 8), "c4": (112, 16),
                                                                        "c5": (320, 32)}
    assert backbone.pixel_mean == (0.5, 0.5, 0.5) and backbone.pixel_std == (0.5, 0.5, 0.5)
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, 128, 96))
    for level, feature in outputs.items():
        assert tuple(feature.shape) == (2, declared[level].channels, 128 // declared[level].stride,
                                        96 // declared[level].stride)
    source = efficientnet_lite_state_dict("efficientnet_lite0")
    assert torch.equal(backbone.body.blocks[5][0].conv_pw.weight, source["blocks.5.0.conv_pw.weight"])


def test_auto_freezing_follows_the_weights():
    """Pretrained: frozen BN, stem and stride-4 blocks frozen. From scratch: batch statistics, all trainable."""
    assert resolve_freezing("imagenet", "auto", "auto") == (1, "frozen_bn")
    assert resolve_freezing("/some/file.pth", "auto", "auto") == (1, "frozen_bn")
    assert resolve_freezing("none", "auto", "auto") == (-1, "bn")
    assert resolve_freezing("none", 2, "syncbn") == (2, "syncbn")
    with pytest.raises(BackboneError, match="frozen_stages"):
        resolve_freezing("none", "some", "auto")

    pretrained = build_backbone("efficientnet_lite0", weights="imagenet", frozen_stages="auto", norm="auto")
    body = pretrained.body
    assert not any(p.requires_grad for p in body.conv_stem.parameters())
    assert not any(p.requires_grad for p in body.blocks[1].parameters())  # stride 4: stage 1
    assert all(p.requires_grad for p in body.blocks[2].parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())  # all converted to frozen BN

    scratch = build_backbone("efficientnet_lite0", weights="none", frozen_stages="auto", norm="auto").train()
    assert all(p.requires_grad for p in scratch.parameters())
    norms = [m for m in scratch.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.training for m in norms)


def test_timm_model_declares_shapes_and_freezes_by_stride():
    """Any features_only model: levels from feature_info, stem + stride-4 stage frozen by frozen_stages=1."""
    backbone = build_backbone("timm:resnet18", weights="none", frozen_stages=1, norm="bn",
                              levels=("c2", "c3", "c4", "c5")).train()
    declared = backbone.output_shapes()
    assert [declared[k].channels for k in ("c2", "c3", "c4", "c5")] == [64, 128, 256, 512]
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in outputs.items()} == {
        level: (declared[level].channels, 64 // declared[level].stride, 96 // declared[level].stride)
        for level in declared}
    body = backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters()) and not body.layer1[0].bn1.training
    assert all(p.requires_grad for p in body.layer2.parameters()) and body.layer2[0].bn1.training


def test_timm_weights_file_is_loaded_and_misfits_are_reported(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # classifier keys are left over, not an error
    backbone = build_backbone("timm:resnet18", weights=str(path))
    assert torch.equal(backbone.body.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    wrong = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit timm's resnet18"):
        build_backbone("timm:resnet18", weights=str(wrong))


@pytest.mark.parametrize("name, message", [("timm:vit_tiny_patch16_224", "no feature at stride 8"),
                                           ("timm:no_such_net", "timm has no such model"),
                                           ("timm:", "backbone.model")])
def test_bad_timm_models_raise_backbone_error(name, message):
    with pytest.raises(BackboneError, match=message):
        build_backbone(name, weights="none")


def test_timm_imagenet_offline_names_the_file_alternative(monkeypatch, tmp_path):
    """backbone=timm backbone.weights=imagenet without network: at once (hub cache only, no retries),
    a UserError of one line (exit 2 at the CLI) naming backbone.weights=<file>."""
    import detector.model.timm_backbone as timm_backbone

    monkeypatch.setattr(timm_backbone, "_hub_reachable", lambda timeout_s=3.0: False)  # what no network gives
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(WeightsError, match=r"backbone\.weights=/path/to/resnet18\.pth") as info:
        build_backbone("timm:resnet18", weights="imagenet")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert hub_constants.HF_HUB_OFFLINE is False  # the offline switch was only for the call
