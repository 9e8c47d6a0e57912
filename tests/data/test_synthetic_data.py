"""The synthetic shapes generator: determinism, content, FCOS level coverage, caching, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from detector.cache_dir import default_cache_dir, resolve_cache_dir
from detector.data.errors import DataError
from detector.commands.synth import synth_command
from detector.data.synthetic import (
    CLASS_NAMES,
    SynthSpec,
    ensure_synthetic,
    sample_layout,
    spec_from_config,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
FCOS_RANGES = (0, 64, 128, 256, 512, float("inf"))  # authors' P3..P7 regression ranges
FCOS_STRIDES = (8, 16, 32, 64, 128)
SMALL = dict(image_max_side=256, large_max_side=320)  # fast: small images


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth") / "ds", 16, 4, seed=3, workers=1, **SMALL)


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    # 40 images: enough for the 2-worker pool to be used
    a = write_dataset(tmp_path / "a", 36, 4, seed=7, workers=2, **SMALL)
    b = write_dataset(tmp_path / "b", 36, 4, seed=7, workers=1, **SMALL)
    files_a, files_b = _files(a), _files(b)
    assert files_a.keys() == files_b.keys()
    assert "annotations/instances_train.json" in files_a and "val/000004.jpg" in files_a
    for name in files_a:
        assert files_a[name] == files_b[name], name


def test_different_seed_gives_different_annotations(tmp_path):
    a = write_dataset(tmp_path / "a", 6, 2, seed=1, workers=1, **SMALL)
    b = write_dataset(tmp_path / "b", 6, 2, seed=2, workers=1, **SMALL)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (a / name).read_bytes() != (b / name).read_bytes()


def test_image_content_depends_only_on_seed_split_and_index(tmp_path):
    few = write_dataset(tmp_path / "few", 3, 1, seed=5, workers=1, **SMALL)
    more = write_dataset(tmp_path / "more", 5, 1, seed=5, workers=1, **SMALL)
    for i in (1, 2, 3):
        assert (few / "train" / f"{i:06d}.jpg").read_bytes() == (more / "train" / f"{i:06d}.jpg").read_bytes()


def test_dataset_has_coco_layout_counts_classes_and_boxes_inside_images(small_set):
    for split, count in (("train", 16), ("val", 4)):
        data = json.loads((small_set / "annotations" / f"instances_{split}.json").read_text())
        assert len(data["images"]) == count
        assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
        assert len(CLASS_NAMES) >= 5
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for img in data["images"]:
            assert (small_set / split / img["file_name"]).is_file()
        per_image = {i: 0 for i in sizes}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            assert ann["category_id"] in range(1, len(CLASS_NAMES) + 1) and ann["iscrowd"] == 0
            per_image[ann["image_id"]] += 1
        assert all(0 <= n <= 10 for n in per_image.values())
    assert (small_set / "params.json").is_file()


def test_written_boxes_are_the_sampled_layout(small_set):
    spec = SynthSpec(num_train=16, num_val=4, seed=3, **SMALL)
    data = json.loads((small_set / "annotations" / "instances_train.json").read_text())
    for img in data["images"][:5]:
        layout = sample_layout(spec, "train", img["id"] - 1)
        assert (layout.width, layout.height) == (img["width"], img["height"])
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert [a["category_id"] - 1 for a in anns] == [o.label for o in layout.objects]
        for ann, obj in zip(anns, layout.objects):
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], obj.box, atol=0.02)


def _default_layouts(split: str = "train"):
    spec = spec_from_config(OmegaConf.load(ROOT / "conf/data/synthetic.yaml"))
    return spec, [sample_layout(spec, split, i) for i in range(spec.count(split))]


def test_default_dataset_gives_positives_on_every_fcos_level():
    """At native resolution (the default transform), P3..P7 each get positive points."""
    _, layouts = _default_layouts()
    positives = np.zeros(len(FCOS_STRIDES), dtype=np.int64)
    for layout in layouts:
        if not layout.objects:
            continue
        boxes = np.array([o.box for o in layout.objects])  # (B, 4)
        for level, stride in enumerate(FCOS_STRIDES):
            xs = np.arange(stride // 2, layout.width, stride)
            ys = np.arange(stride // 2, layout.height, stride)
            px, py = (a.ravel()[:, None] for a in np.meshgrid(xs, ys))  # (P, 1)
            ltrb = np.stack([px - boxes[:, 0], py - boxes[:, 1], boxes[:, 2] - px, boxes[:, 3] - py], -1)  # (P, B, 4)
            reach = ltrb.max(-1)
            hit = (ltrb.min(-1) > 0) & (reach >= FCOS_RANGES[level]) & (reach <= FCOS_RANGES[level + 1])
            positives[level] += hit.any(1).sum()
    assert (positives > 0).all(), f"positives per level P3..P7: {positives.tolist()}"
    assert positives[4] >= 20  # P7 is not a fluke of one image


def test_default_object_sizes_and_image_sizes_span_the_requested_ranges():
    spec, layouts = _default_layouts()
    sides = np.array([max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for lay in layouts for o in lay.objects])
    shorts = np.array([min(o.box[2] - o.box[0], o.box[3] - o.box[1]) for lay in layouts for o in lay.objects])
    assert shorts.min() >= spec.min_object_size - 1e-6 and shorts.min() < 12
    assert sides.max() > 512 and (sides > 300).sum() >= 20
    counts = [len(lay.objects) for lay in layouts]
    assert min(counts) == 0 and max(counts) == 10
    long_sides = [max(lay.width, lay.height) for lay in layouts]
    assert max(long_sides) > 700 and min(min(lay.width, lay.height) for lay in layouts) < 220
    aspects = [lay.width / lay.height for lay in layouts]
    assert min(aspects) < 0.6 and max(aspects) > 1.6
    labels = {o.label for lay in layouts for o in lay.objects}
    assert labels == set(range(len(CLASS_NAMES)))


def test_config_file_matches_generator_defaults():
    spec, _ = _default_layouts("val")
    assert spec == SynthSpec()


def test_bad_generator_parameters_raise_data_error():
    with pytest.raises(DataError, match="image_format"):
        SynthSpec(image_format="bmp")
    with pytest.raises(DataError, match="num_train"):
        SynthSpec(num_train=0, num_val=0)


def test_ensure_synthetic_generates_once_then_reuses(tmp_path):
    cfg = {"name": "synthetic", "num_train": 3, "num_val": 1, "seed": 0, **SMALL}
    root = ensure_synthetic(cfg, tmp_path, progress=False)
    assert root.parent == tmp_path / "synthetic"
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg, tmp_path, progress=False) == root
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    other = ensure_synthetic({**cfg, "seed": 1}, tmp_path, progress=False)
    assert other != root
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == sorted([root.name, other.name])  # no temp left


def test_cache_dir_follows_xdg_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "nasfcos"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "nasfcos"
    assert resolve_cache_dir(None) == default_cache_dir()
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"


def _synth_cfg(out, **data):
    return OmegaConf.create({"out": out, "data": {"name": "synthetic", "num_train": 2, "num_val": 1, **SMALL, **data}})


def test_synth_command_writes_a_new_folder(tmp_path, capsys):
    out = synth_command(_synth_cfg(str(tmp_path / "new")))
    assert (out / "annotations" / "instances_val.json").is_file() and len(list((out / "train").iterdir())) == 2
    assert "wrote 2 train and 1 val images" in capsys.readouterr().out


def test_synth_command_never_overwrites_user_data(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        synth_command(_synth_cfg(str(tmp_path / "full")))
    assert (tmp_path / "full" / "precious.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="out=<dir>"):
        synth_command(_synth_cfg(None))
    with pytest.raises(DataError, match="data=coco"):
        synth_command(_synth_cfg(str(tmp_path / "x"), name="coco"))
