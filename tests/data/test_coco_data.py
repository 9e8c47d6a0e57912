"""COCO-format loading: sample contract, transforms, crowd/empty images, label mapping, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from detector.data.coco import CocoDetection, build_dataset, build_loader
from detector.data.synthetic import write_dataset
from detector.data.transforms import DetectionTransform, pad_batch, resize_scale

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("coco") / "ds", 12, 4, seed=11, workers=1, large_every=6)


def _synth_cfg(root: Path, **overrides):
    cfg = OmegaConf.load(ROOT / "conf/data/synthetic.yaml")
    cfg.root = str(root)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _write_coco(root: Path, split: str, images: list[tuple[str, Image.Image]], anns: list[dict], categories: list[dict]):
    """A tiny COCO-format dataset in real COCO's layout: root/<split>/, root/annotations/instances_<split>.json."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i, (name, image) in enumerate(images):
        image.save(root / split / name)
        entries.append({"id": i + 1, "file_name": name, "width": image.size[0], "height": image.size[1]})
    for i, ann in enumerate(anns):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
    data = {"images": entries, "annotations": anns, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_sample_contract(synth_root):
    dataset = build_dataset(_synth_cfg(synth_root), "train", train=True)
    assert len(dataset) == 12 and dataset.num_classes == 6
    for index in range(4):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.2  # 0-1, not normalised
        assert image.is_contiguous()
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and (labels >= 0).all() and (labels < 6).all()
        assert isinstance(target["image_id"], int) and isinstance(target["scale"], float)
        h, w = image.shape[1:]
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()


def test_uint8_images_are_the_same_pixels_and_the_model_converts_them_bit_identically(synth_root):
    """The training loader's uint8 transport changes no bit of what the model sees."""
    from detector.model.build import build_detector
    from detector.bench.models import load_recipe
    from detector.arch.zoo import zoo_arch

    floats = build_dataset(_synth_cfg(synth_root), "train", train=True)
    bytes_ = build_dataset(_synth_cfg(synth_root), "train", train=True, uint8_images=True)
    model = build_detector(zoo_arch("fcos"), 6, load_recipe("nasfcos"), "resnet18", width=32)
    for index in range(3):
        torch.manual_seed(index)  # same augmentation draw for both
        image, target = floats[index]
        torch.manual_seed(index)
        pixels, target_u8 = bytes_[index]
        assert pixels.dtype == torch.uint8 and pixels.shape == image.shape and pixels.is_contiguous()
        assert torch.equal(pixels.float() / 255.0, image)
        assert torch.equal(target["boxes"], target_u8["boxes"])
        assert torch.equal(model.normalize(pixels), model.normalize(image))


def test_resize_scales_image_and_boxes_together(synth_root):
    native = build_dataset(_synth_cfg(synth_root), "val", train=False)
    resized = build_dataset(_synth_cfg(synth_root, val_size=128, max_size=200), "val", train=False)
    for index in range(len(native)):
        _, t0 = native[index]
        image, t1 = resized[index]
        h0, w0 = t0["orig_size"]
        assert t1["orig_size"] == (h0, w0) and t0["scale"] == 1.0
        scale = t1["scale"]
        assert scale == pytest.approx(resize_scale(h0, w0, 128, 200))
        assert tuple(image.shape[1:]) == (round(h0 * scale), round(w0 * scale))
        assert min(image.shape[1:]) == 128 or max(image.shape[1:]) == 200
        torch.testing.assert_close(t1["boxes"], (t0["boxes"] * scale).clamp(min=0), rtol=0, atol=1.0)


def test_train_sizes_are_drawn_from_the_list(synth_root):
    dataset = build_dataset(_synth_cfg(synth_root, train_sizes=[96, 160], max_size=1000), "train", train=True)
    torch.manual_seed(0)
    shorts = {min(dataset[i % 3][0].shape[1:]) for i in range(12)}
    assert shorts == {96, 160}


def test_horizontal_flip_moves_boxes_with_pixels(synth_root):
    dataset = CocoDetection(synth_root / "train", synth_root / "annotations/instances_train.json")
    image = dataset.load_image(0)
    boxes = dataset._targets[0][0]
    assert len(boxes) > 0
    plain, plain_boxes, _ = DetectionTransform(None, None, flip_prob=0.0)(image, boxes)
    flipped, flipped_boxes, _ = DetectionTransform(None, None, flip_prob=1.0)(image, boxes)
    width = plain.shape[2]
    torch.testing.assert_close(flipped, plain.flip(-1))
    np.testing.assert_allclose(flipped_boxes[:, [0, 2]], width - plain_boxes[:, [2, 0]])
    np.testing.assert_allclose(flipped_boxes[:, [1, 3]], plain_boxes[:, [1, 3]])
    x0, y0, x1, y1 = (int(round(v)) for v in plain_boxes[0])
    fx0, _, fx1, _ = (int(round(v)) for v in flipped_boxes[0])
    torch.testing.assert_close(flipped[:, y0:y1, fx0:fx1], plain[:, y0:y1, x0:x1].flip(-1))


def test_crowd_boxes_are_left_out_and_empty_images_kept(tmp_path):
    images = [("a.png", Image.new("RGB", (64, 48), "red")), ("b.png", Image.new("RGB", (40, 40), "blue"))]
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12]},
        {"image_id": 1, "category_id": 1, "bbox": [20, 5, 30, 30], "iscrowd": 1},
    ]
    _write_coco(tmp_path, "train2017", images, anns, [{"id": 1, "name": "thing"}])
    dataset = CocoDetection(tmp_path / "train2017", tmp_path / "annotations/instances_train2017.json")
    _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 15.0]]))
    assert dataset.box_report["crowd"] == 1
    image, empty = dataset[1]
    assert image.shape == (3, 40, 40)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64


def test_category_ids_map_to_contiguous_labels(tmp_path):
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    anns = [{"image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for c in (3, 7, 90)]
    _write_coco(tmp_path, "val2017", [("a.jpg", Image.new("RGB", (32, 32)))], anns, cats)
    dataset = CocoDetection(tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json")
    assert dataset.label_to_cat_id == [3, 7, 90] and dataset.class_names == ["car", "train", "toothbrush"]
    assert dataset[0][1]["labels"].tolist() == [0, 1, 2]


def test_coco_config_reads_real_coco_layout(tmp_path):
    anns = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    cats = [{"id": i + 1} for i in range(80)]
    images = [("000000000139.jpg", Image.new("RGB", (100, 80))), ("000000000285.jpg", Image.new("RGB", (200, 50)))]
    _write_coco(tmp_path, "val2017", images, anns, cats)
    cfg = OmegaConf.load(ROOT / "conf/data/coco.yaml")
    cfg.root = str(tmp_path)
    dataset = build_dataset(cfg, "val", train=False)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 800, 1000) and target["scale"] == pytest.approx(10.0)  # short side 800
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10.0, 60.0, 60.0]]))
    image, target = dataset[1]
    assert image.shape[2] == 1333 and target["scale"] == pytest.approx(1333 / 200)  # long side capped at 1333


def test_pad_batch_pads_to_multiple_of_32_and_keeps_content():
    images = [torch.rand(3, 50, 70), torch.rand(3, 33, 100)]
    batch, sizes = pad_batch(images, size_divisible=32)
    assert batch.shape == (2, 3, 64, 128) and sizes == [(50, 70), (33, 100)]
    torch.testing.assert_close(batch[0, :, :50, :70], images[0])
    torch.testing.assert_close(batch[1, :, :33, :100], images[1])
    assert batch[0, :, 50:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0


def test_loader_batches_are_lists_and_seeded_order_repeats(synth_root):
    cfg = _synth_cfg(synth_root, train_sizes=[64], max_size=128)

    def first_epoch(seed):
        loader = build_loader(cfg, "train", batch_size=5, train=True, workers=0, seed=seed)
        torch.manual_seed(seed)  # flips come from the global generator without workers
        return [(t["image_id"], t["boxes"].sum().item()) for _, targets in loader for t in targets]

    loader = build_loader(cfg, "train", batch_size=5, train=True, workers=0, seed=0)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 5 and len(targets) == 5
    assert len(list(loader)) == 3  # 12 images, last partial batch kept
    assert first_epoch(1) == first_epoch(1)
    assert [i for i, _ in first_epoch(1)] != [i for i, _ in first_epoch(2)]
    val = build_loader(cfg, "val", batch_size=3, train=False, workers=0, seed=0)
    assert [t["image_id"] for _, ts in val for t in ts] == [1, 2, 3, 4]


def test_loader_with_worker_processes_is_reproducible(synth_root):
    cfg = _synth_cfg(synth_root, train_sizes=[64, 96], max_size=160)

    def run():
        loader = build_loader(cfg, "train", batch_size=4, train=True, workers=1, seed=5)
        return [(t["image_id"], round(t["scale"], 6), t["boxes"].sum().item()) for _, ts in loader for t in ts]

    assert run() == run()


def test_distributed_loader_uses_distributed_sampler(synth_root, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(_synth_cfg(synth_root), "train", batch_size=4, train=True, workers=0, seed=0, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert sorted(t["image_id"] for _, ts in loader for t in ts) == list(range(1, 13))
    finally:
        dist.destroy_process_group()
