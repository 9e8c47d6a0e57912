"""Prepare: proxy images from the training split, adaptation, feature caching, reuse and rebuild.

Runs on a tiny synthetic dataset (20 small training images) with ResNet-18 at random init,
96 px proxy inputs and two adaptation iterations: the real code path, a few seconds.
"""
import dataclasses
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from detector.model.build import build_detector
from detector.cli import CONF_DIR, compose
from detector.data.synthetic import write_dataset
from detector.model.recipe import Recipe
from detector.arch.zoo import zoo_arch
from proxy_eval import prepare as prepare_module
from proxy_eval.feature_cache import FeatureCache
from proxy_eval.settings import BackboneSpec, PrepareError, PrepareSettings
from proxy_eval.prepare import ProxyImages, letterbox, normalised_batch, prepare_command, prepare_features

RESOLUTION = 96
SETTINGS = PrepareSettings(train_images=12, val_images=6, split_seed=0, resolution=RESOLUTION, width=32,
                           adapt_iters=2, adapt_batch_size=4, extract_batch_size=8)
BACKBONE = BackboneSpec(name="resnet18", weights="none")
RECIPE = Recipe.from_cfg(OmegaConf.load(CONF_DIR / "recipe" / "nasfcos.yaml"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, num_train=20, num_val=3, seed=0, workers=1, image_min_side=64, image_max_side=96,
                  large_every=0, max_objects=3, min_object_size=8)
    return root


def data_cfg(root):
    return {"name": "synthetic", "root": str(root), "train_split": "train", "val_split": "val", "num_classes": 6}


def run_prepare(root, cache_dir, settings=SETTINGS):
    return prepare_features(settings, data_cfg(root), BACKBONE, RECIPE, 6, cache_dir=cache_dir)


def test_second_prepare_reuses_the_cache_without_adapting_again(data_root, tmp_path, monkeypatch):
    first = run_prepare(data_root, tmp_path)
    stamp = first.tensor_file.stat().st_mtime_ns

    def no_adaptation(*args, **kwargs):
        raise AssertionError("the cache was rebuilt although it was valid")

    monkeypatch.setattr(prepare_module, "_build_adapted_detector", no_adaptation)
    second = run_prepare(data_root, tmp_path)
    assert second.path == first.path and second.tensor_file.stat().st_mtime_ns == stamp


def test_a_corrupt_cache_is_rebuilt_with_a_warning_and_gives_the_same_features(data_root, tmp_path, caplog):
    cache = run_prepare(data_root, tmp_path)
    before = cache.load()
    data = bytearray(cache.tensor_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.tensor_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="proxy_eval.prepare"):
        rebuilt = run_prepare(data_root, tmp_path)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    after = rebuilt.load()  # verifies the new checksum
    for level, tensor in before.train.features.items():  # adaptation and extraction are seeded
        torch.testing.assert_close(after.train.features[level], tensor)


def test_proxy_images_come_from_the_training_split_only(data_root, tmp_path):
    cache = run_prepare(data_root, tmp_path)
    material = cache.meta()["material"]
    assert material["data"]["ann_file"].endswith("instances_train.json")
    train_json = json.loads((data_root / "annotations" / "instances_train.json").read_text())
    train_ids = {image["id"] for image in train_json["images"]}
    features = cache.load()
    assert set(features.train.image_ids) == set(material["splits"]["train"])
    assert set(features.val.image_ids) == set(material["splits"]["val"])
    assert set(features.train.image_ids) | set(features.val.image_ids) <= train_ids
    assert not set(features.train.image_ids) & set(features.val.image_ids)
    assert (len(features.train), len(features.val)) == (12, 6)


def test_features_are_fp16_backbone_levels_at_the_proxy_resolution(data_root, tmp_path):
    features = run_prepare(data_root, tmp_path).load()
    assert features.shapes == {"c3": (128, 8), "c4": (256, 16), "c5": (512, 32)}
    for level, (channels, stride) in features.shapes.items():
        tensor = features.val.features[level]
        assert tensor.dtype == torch.float16
        assert tuple(tensor.shape) == (6, channels, RESOLUTION // stride, RESOLUTION // stride)
    for (height, width), boxes in zip(features.train.sizes, features.train.boxes):
        assert max(height, width) == RESOLUTION  # letterboxed: the long side fills the input
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= SETTINGS.min_box_size).all()


def test_letterbox_scales_boxes_with_the_image():
    image = torch.rand(3, 50, 200)
    boxes = torch.tensor([[20.0, 10.0, 120.0, 40.0]])
    resized, scaled, scale = letterbox(image, boxes, 100)
    assert tuple(resized.shape) == (3, 25, 100) and scale == 0.5
    torch.testing.assert_close(scaled, torch.tensor([[10.0, 5.0, 60.0, 20.0]]))


def test_adapt_from_a_detection_checkpoint_uses_its_backbone(data_root, tmp_path):
    torch.manual_seed(123)
    detector = build_detector(zoo_arch("fcos"), 6, RECIPE, "resnet18", "none", width=32)
    checkpoint = tmp_path / "detector.pth"
    torch.save({"model": detector.state_dict(), "iteration": 7}, checkpoint)
    settings = dataclasses.replace(SETTINGS, adapt_from=str(checkpoint), adapt_iters=0)
    cache = run_prepare(data_root, tmp_path / "cache", settings)
    features = cache.load()
    dataset_images = ProxyImages(_train_dataset(data_root), features.val.image_ids[:2], RESOLUTION, 1.0)
    images = [dataset_images[k][0] for k in range(2)]
    detector.eval()
    with torch.no_grad():
        expected = detector.backbone(normalised_batch(images, detector, RESOLUTION, torch.device("cpu")))
    torch.testing.assert_close(features.val.features["c4"][:2].float(), expected["c4"], atol=2e-2, rtol=2e-3)


def test_adapt_from_a_checkpoint_without_the_backbone_is_a_user_error(data_root, tmp_path):
    checkpoint = tmp_path / "other.pth"
    torch.save({"head.weight": torch.zeros(3)}, checkpoint)
    settings = dataclasses.replace(SETTINGS, adapt_from=str(checkpoint))
    with pytest.raises(PrepareError, match="lacks .* backbone tensors"):
        run_prepare(data_root, tmp_path, settings)


def test_bad_resolution_is_a_user_error():
    with pytest.raises(PrepareError, match="multiple of 32"):
        dataclasses.replace(SETTINGS, resolution=100)


def test_prepare_command_builds_the_cache_from_the_search_config(data_root, tmp_path, capsys):
    cfg = compose("search", [
        f"data.root={data_root}", f"cache_dir={tmp_path}", "backbone.weights=none", "device=cpu",
        "proxy_eval=cached", "proxy_eval.train_images=8", "proxy_eval.val_images=4",
        f"proxy_eval.resolution={RESOLUTION}", "proxy_eval.width=32", "proxy_eval.adapt_iters=1",
        "proxy_eval.adapt_batch_size=4",
    ])
    cache = prepare_command(cfg)
    assert isinstance(cache, FeatureCache) and cache.exists()
    assert cache.path.parent == tmp_path / "features"
    assert str(cache.path) in capsys.readouterr().out
    assert cache.meta()["material"]["resolution"] == RESOLUTION


def _train_dataset(root):
    from detector.data.coco import CocoDetection

    return CocoDetection(root / "train", root / "annotations" / "instances_train.json")
