"""Bad input: every documented case gives a one-line DataError or a counted, logged skip."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from detector.data.coco import CocoDetection, build_dataset, build_loader, resolve_data_root
from detector.data.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SPLIT = "train2017"
CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _write(root: Path, images: dict[str, Image.Image | bytes], anns: list[dict], categories=CATS, sizes=None) -> Path:
    """Write a COCO-layout dataset; image entries get ids 1.. in order. Returns the annotation file."""
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i, (name, image) in enumerate(images.items()):
        if isinstance(image, bytes):
            (root / SPLIT / name).write_bytes(image)
            width, height = (sizes or {}).get(name, (32, 32))
        else:
            image.save(root / SPLIT / name)
            width, height = image.size
        entries.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    anns = [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(anns)]
    ann_file = root / "annotations" / f"instances_{SPLIT}.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return ann_file


def _open(root: Path) -> CocoDetection:
    return CocoDetection(root / SPLIT, root / "annotations" / f"instances_{SPLIT}.json")


def _rgb(w=32, h=32):
    return Image.new("RGB", (w, h), (200, 30, 30))


def test_data_error_is_the_user_error_the_cli_reports():
    from detector.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


def test_missing_image_file_fails_at_construction(tmp_path):
    ann_file = _write(tmp_path, {"a.png": _rgb()}, [])
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 2, "file_name": "gone.png", "width": 32, "height": 32})
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"1 of 2 images .* missing .*'gone.png'"):
        _open(tmp_path)


def test_image_deleted_after_construction_fails_at_load_naming_it(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [])
    dataset = _open(tmp_path)
    (tmp_path / SPLIT / "a.png").unlink()
    with pytest.raises(DataError, match="a.png is missing"):
        dataset[0]


@pytest.mark.parametrize("text", ["{not json", '{"images": [{"id": 1, "file_na', ""])
def test_malformed_or_truncated_json(tmp_path, text):
    _write(tmp_path, {"a.png": _rgb()}, [])
    (tmp_path / "annotations" / f"instances_{SPLIT}.json").write_text(text)
    with pytest.raises(DataError, match="not valid JSON"):
        _open(tmp_path)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "JSON object"),
        ({"images": [], "annotations": []}, "no 'categories' list"),
        ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": CATS}, "image #0"),
        ({"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], "annotations": [{"id": 1}], "categories": CATS}, "annotation #0"),
    ],
)
def test_structurally_wrong_annotation_files(tmp_path, data, message):
    _write(tmp_path, {"a.png": _rgb()}, [])
    (tmp_path / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        _open(tmp_path)


def test_unknown_category_id(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [{"image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(DataError, match="category_id 5, which is not among the categories"):
        _open(tmp_path)


def test_annotation_for_unlisted_image(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [{"image_id": 7, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(DataError, match="image_id 7"):
        _open(tmp_path)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "3", 4], [1, 2, float("nan"), 4], None])
def test_malformed_bbox(tmp_path, bbox):
    _write(tmp_path, {"a.png": _rgb()}, [{"image_id": 1, "category_id": 1, "bbox": bbox}])
    with pytest.raises(DataError, match="bbox"):
        _open(tmp_path)


def test_degenerate_and_outside_boxes_are_skipped_counted_and_logged(tmp_path, caplog):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},  # fine
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 10, -3]},  # negative height
        {"image_id": 1, "category_id": 2, "bbox": [40, 40, 10, 10]},  # wholly outside the 32x32 image
        {"image_id": 1, "category_id": 2, "bbox": [-4, 20, 10, 30]},  # partly outside: clipped
    ]
    _write(tmp_path, {"a.png": _rgb()}, anns)
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        dataset = _open(tmp_path)
    assert dataset.box_report["degenerate"] == 2
    assert dataset.box_report["outside"] == 1 and dataset.box_report["clipped"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 boxes with zero/negative size" in warnings[0].getMessage()
    _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1.0, 11.0, 11.0], [0.0, 20.0, 6.0, 32.0]]))
    assert target["labels"].tolist() == [0, 1]


def test_clipping_alone_is_counted_without_a_warning(tmp_path, caplog):
    _write(tmp_path, {"a.png": _rgb()}, [{"image_id": 1, "category_id": 1, "bbox": [20, 20, 20, 20]}])
    with caplog.at_level(logging.INFO, logger="detector.data.coco"):
        dataset = _open(tmp_path)
    assert dataset.box_report["clipped"] == 1
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "clipped 1" in caplog.records[0].getMessage()
    torch.testing.assert_close(dataset[0][1]["boxes"], torch.tensor([[20.0, 20.0, 32.0, 32.0]]))


def _cmyk():
    return Image.new("CMYK", (32, 32), (0, 255, 255, 0))


def _palette_with_transparency():
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return image


def _sixteen_bit():
    return Image.fromarray(np.full((32, 32), 60000, dtype=np.uint16))


@pytest.mark.parametrize(
    "name, make",
    [
        ("gray.png", lambda: Image.new("L", (32, 32), 128)),
        ("cmyk.jpg", _cmyk),
        ("palette.png", _palette_with_transparency),
        ("rgba.png", lambda: Image.new("RGBA", (32, 32), (255, 0, 0, 128))),
        ("deep.png", _sixteen_bit),
        ("bw.png", lambda: Image.new("1", (32, 32), 1)),
    ],
)
def test_non_rgb_images_become_rgb(tmp_path, name, make):
    image = make()
    _write(tmp_path, {name: image}, [])
    tensor, _ = _open(tmp_path)[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0 and tensor.max() > 0.2
    if image.mode == "L":
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
    if image.mode == "P":
        assert tensor[0].mean() > 0.9 and tensor[1].mean() < 0.1  # palette entry 1 is red


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("payload", [b"this is not an image", _jpeg_bytes()[:300], b""])
def test_corrupt_or_truncated_image_bytes_name_the_file(tmp_path, payload):
    _write(tmp_path, {"broken.jpg": payload}, [])
    with pytest.raises(DataError, match=r"cannot decode image .*broken.jpg"):
        _open(tmp_path)[0]


def test_corrupt_image_in_a_worker_process_still_gives_one_line(tmp_path):
    _write(tmp_path, {"broken.jpg": b"garbage"}, [])
    cfg = OmegaConf.create({"name": "coco", "root": str(tmp_path), "train_split": SPLIT, "num_classes": 2})
    loader = build_loader(cfg, "train", batch_size=1, train=False, workers=1, seed=0)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    del info, loader  # shut the worker down now, not in a later test's garbage collection
    assert "\n" not in message and "cannot decode image" in message and "broken.jpg" in message


def test_image_size_disagreeing_with_annotations(tmp_path):
    _write(tmp_path, {"a.png": _rgb(40, 30)}, [])
    ann_file = tmp_path / "annotations" / f"instances_{SPLIT}.json"
    data = json.loads(ann_file.read_text())
    data["images"][0]["width"] = 64
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="is 40x30 but .* says 64x30"):
        _open(tmp_path)[0]


def test_empty_dataset(tmp_path):
    _write(tmp_path, {}, [])
    with pytest.raises(DataError, match="lists no images"):
        _open(tmp_path)


def test_no_categories(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [], categories=[])
    with pytest.raises(DataError, match="no categories"):
        _open(tmp_path)


def _coco_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf/data/coco.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_root_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*nowhere does not exist"):
        resolve_data_root(_coco_cfg(root=str(tmp_path / "nowhere")))


def test_coco_without_root_names_the_override():
    with pytest.raises(DataError, match=r"data.root is not set .* pass data.root="):
        resolve_data_root(_coco_cfg())


def test_missing_split_folder_or_annotation_file(tmp_path):
    with pytest.raises(DataError, match="image folder .*train2017 does not exist"):
        build_dataset(_coco_cfg(root=str(tmp_path)), "train", train=True)
    (tmp_path / "train2017").mkdir()
    with pytest.raises(DataError, match="annotation file .*instances_train2017.json does not exist"):
        build_dataset(_coco_cfg(root=str(tmp_path)), "train", train=True)


def test_num_classes_disagreeing_with_categories(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [])
    with pytest.raises(DataError, match="data.num_classes=80 but .* 2 categories; pass data.num_classes=2"):
        build_dataset(_coco_cfg(root=str(tmp_path)), "train", train=True)


@pytest.mark.parametrize("key, value, message", [("train_sizes", "big", "train_sizes"), ("max_size", -1, "max_size")])
def test_bad_resize_settings(tmp_path, key, value, message):
    _write(tmp_path, {"a.png": _rgb()}, [])
    with pytest.raises(DataError, match=message):
        build_dataset(_coco_cfg(root=str(tmp_path), num_classes=2, **{key: value}), "train", train=True)


# ---------------------------------------------------------------------- ids that are not integers (#22)
@pytest.mark.parametrize("where,value", [
    ("image", "img_17"), ("image", "17"), ("image", 17.0), ("image", True),
    ("category", "90"), ("category", "1"), ("category", None),
    ("annotation", "a1"), ("annotation", "1"),
])
def test_ids_that_are_not_integers_are_refused_when_the_dataset_opens(tmp_path, where, value):
    """A string id crashed training (image ids), failed the final evaluation (numeric strings) or
    evaluated to AP 0 silently (category ids): refused at construction, naming the id."""
    ann_file = _write(tmp_path, {"a.png": _rgb()}, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}])
    data = json.loads(ann_file.read_text())
    if where == "image":
        data["images"][0]["id"] = value
        data["annotations"][0]["image_id"] = value
    elif where == "category":
        data["categories"][0]["id"] = value
        data["annotations"][0]["category_id"] = value
    else:
        data["annotations"][0]["id"] = value
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{where} id .* COCO ids must be integers") as err:
        _open(tmp_path)
    assert "\n" not in str(err.value)


def test_duplicate_category_ids_are_refused(tmp_path):
    _write(tmp_path, {"a.png": _rgb()}, [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(DataError, match="category id 1 appears twice"):
        _open(tmp_path)


@pytest.mark.parametrize("ids", [[1, 1], [5, 5, 5], [3, 1, 3, 1], [7, 2, 7]])
def test_repeated_annotation_ids_are_renumbered_so_a_perfect_detector_scores_ap_1(tmp_path, caplog, ids):
    """pycocotools indexes ground truth by annotation id: with repeated ids a perfect detector
    scored AP 0.978 while training used every box. Renumbered at open, with one warning, the
    ground truth fed back as detections scores 1.0 and training sees the same boxes."""
    from detector.data.coco_eval import evaluate_detections

    boxes = [[2 + 12 * i, 3 + 10 * i, 10, 9] for i in range(len(ids))]
    ann_file = _write(tmp_path, {"a.png": _rgb(64, 64)},
                      [{"image_id": 1, "category_id": 1 + i % 2, "bbox": b, "area": 90} for i, b in enumerate(boxes)])
    data = json.loads(ann_file.read_text())
    for ann, ann_id in zip(data["annotations"], ids):
        ann["id"] = ann_id
    ann_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        dataset = _open(tmp_path)
    assert "renumbered" in caplog.text
    new_ids = [a["id"] for a in dataset.coco.dataset["annotations"]]
    assert len(set(new_ids)) == len(ids) and len(dataset.coco.anns) == len(ids)
    assert len(dataset._targets[0][0]) == len(ids)
    perfect = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in dataset.coco.dataset["annotations"]]
    metrics = evaluate_detections(dataset.coco, perfect)
    assert metrics["AP"] == pytest.approx(1.0)
