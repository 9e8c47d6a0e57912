"""COCO-format detection data: a torch Dataset over pycocotools, and its DataLoader.

Folder layout (config keys in ``conf/data/*.yaml``)::

    <data.root>/<image_dir>          image_dir = "{split}" by default
    <data.root>/<ann_file>           ann_file  = "annotations/instances_{split}.json" by default

with ``{split}`` = ``data.train_split`` / ``data.val_split``: ``train2017`` / ``val2017`` for real
COCO, ``train`` / ``val`` for the synthetic set (`detector.data.synthetic`). With ``data.name`` =
synthetic and ``data.root`` null the synthetic set is generated into the cache first.

One sample is ``(image, target)``: image float32 (3, H, W) RGB in [0, 1] (not normalised), target
``{boxes: float32 (K, 4) xyxy in the resized image's pixels, labels: int64 (K,) in 0..C-1,
image_id: int, orig_size: (h, w) of the file, scale: float}`` (resized = original * scale).
Labels are category ids mapped in increasing id order (`CocoDetection.label_to_cat_id`, kept for
evaluation). Crowd boxes are left out of training targets; images without boxes are kept (K = 0).

Bad input (also in README_BAD_INPUT.md). Checked when the dataset is built, before training:

- data.root unset (real data) or missing, image folder or annotation file missing -> DataError
- annotation file not valid JSON (malformed or truncated) or missing images / annotations /
  categories lists, an image entry without id / file_name / width / height, duplicate image or
  category ids, an annotation without id / image_id / category_id / bbox, an image, category or
  annotation id that is not an integer (``"img_17"``, ``"17"``), a bbox that is not 4 finite
  numbers -> DataError
- annotation ids repeated (merged datasets) -> renumbered, one logging.warning; training and
  evaluation then see the same boxes
- an annotation whose category_id is not among the categories, or whose image_id is not among
  the images -> DataError (a wrong label is a bug to fix, not to skip)
- no images listed, or no categories -> DataError; listed image files missing -> DataError
  (naming how many and one example)
- boxes with zero or negative width/height, or wholly outside their image -> skipped, counted
  in `CocoDetection.box_report` and reported in one logging.warning per dataset; boxes partly
  outside are clipped to the image (counted as "clipped", logged at info level when nothing
  was skipped)
- data.num_classes disagreeing with the annotation file's categories -> DataError

Checked when an image is loaded (in DataLoader workers): an unreadable file (corrupt or
truncated bytes, not an image) or a file whose size disagrees with the annotation's
width/height -> DataError naming the file. Grayscale, palette, CMYK, RGBA and 16-bit images
are converted to RGB (16-bit and float images rescaled by their maximum). EXIF orientation is
not applied (COCO's boxes refer to the stored pixels).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from detector.data.errors import DataError
from detector.data.transforms import DetectionTransform, build_transform, collate, to_tensor

log = logging.getLogger(__name__)

DEFAULT_IMAGE_DIR = "{split}"
DEFAULT_ANN_FILE = "annotations/instances_{split}.json"


def load_annotation_json(ann_file: Path) -> dict:
    """Parse a COCO annotation file; DataError for a missing, unreadable or malformed one."""
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist; check data.root and the split names")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"annotation file {ann_file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "it may be truncated: re-download or regenerate it"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {ann_file}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {ann_file} must hold a JSON object, not {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation file {ann_file} has no '{key}' list; is it a COCO instances file?")
    return data


def _require_keys(entry: Any, keys: tuple[str, ...], what: str, index: int, ann_file: Path) -> None:
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise DataError(f"{ann_file}: {what} #{index} must be an object with keys {', '.join(keys)}: got {entry!r:.120}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(value: Any, what: str, ann_file: Path) -> None:
    """COCO ids are integers: evaluation (pycocotools) and the image ids carried through training
    compare them as ints, so a string id (``"img_17"`` or even ``"17"``) is refused here, when the
    dataset is opened, instead of failing after training or evaluating to AP 0 silently."""
    if not _is_integer(value):
        raise DataError(f"{ann_file}: {what} {value!r:.40} is a {type(value).__name__}, but COCO ids must be "
                        "integers; renumber them (e.g. map each distinct id to 1, 2, 3, ...) and rewrite the file")


def _renumber_duplicate_annotation_ids(data: dict, ann_file: Path) -> None:
    """Annotations sharing an id (common in merged datasets) get fresh ids above the largest one,
    with one warning. pycocotools indexes ground truth by annotation id: with a repeated id it
    evaluates one box twice and drops the other, while training used both."""
    seen: set[int] = set()
    repeated = []
    for ann in data["annotations"]:
        if ann["id"] in seen:
            repeated.append(ann)
        seen.add(ann["id"])
    if not repeated:
        return
    first = repeated[0]["id"]
    next_id = max(seen) + 1
    for ann in repeated:
        ann["id"], next_id = next_id, next_id + 1
    log.warning("%s: %d annotations repeat an id used before (first: %s); renumbered them from %d on, for "
                "training and evaluation alike", ann_file, len(repeated), first, next_id - len(repeated))


def _check_entries(data: dict, ann_file: Path) -> None:
    """Structural checks on images, categories and annotations; fills COCOeval's defaults and
    renumbers repeated annotation ids (:func:`_renumber_duplicate_annotation_ids`)."""
    if not data["images"]:
        raise DataError(f"annotation file {ann_file} lists no images: the dataset is empty")
    if not data["categories"]:
        raise DataError(f"annotation file {ann_file} lists no categories")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        _require_keys(img, ("id", "file_name", "width", "height"), "image", i, ann_file)
        _check_id(img["id"], "image id", ann_file)
        if img["id"] in image_ids:
            raise DataError(f"{ann_file}: image id {img['id']} appears twice")
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise DataError(f"{ann_file}: image id {img['id']} has width/height {img['width']}/{img['height']}")
        image_ids.add(img["id"])
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        _require_keys(cat, ("id",), "category", i, ann_file)
        _check_id(cat["id"], "category id", ann_file)
        if cat["id"] in cat_ids:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice")
        cat_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        _require_keys(ann, ("id", "image_id", "category_id", "bbox"), "annotation", i, ann_file)
        _check_id(ann["id"], "annotation id", ann_file)
        if ann["category_id"] not in cat_ids:
            raise DataError(
                f"{ann_file}: annotation id {ann['id']} has category_id {ann['category_id']}, "
                f"which is not among the categories {sorted(cat_ids)}; fix the label or add the category"
            )
        if ann["image_id"] not in image_ids:
            raise DataError(f"{ann_file}: annotation id {ann['id']} refers to image_id {ann['image_id']}, which is not listed")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(f"{ann_file}: annotation id {ann['id']} has bbox {bbox!r:.80}; expected [x, y, w, h] numbers")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
    _renumber_duplicate_annotation_ids(data, ann_file)


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO index over an already parsed annotation dict (no prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale/palette/CMYK/RGBA converted, 16-bit/float rescaled by their max."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = float(pixels.max()) if pixels.size else 0.0
        if peak > 255:
            pixels = pixels * (255.0 / peak)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
    return image.convert("RGB")


class CocoDetection(Dataset):
    """COCO-format detection dataset; see the module docstring for the sample contract."""

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transform: DetectionTransform | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist; check data.root and the split names")
        data = load_annotation_json(self.ann_file)
        _check_entries(data, self.ann_file)
        self.coco = coco_from_dict(data)
        self.transform = transform

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [c["id"] for c in categories]
        self.cat_id_to_label: dict[int, int] = {cid: label for label, cid in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.images: list[dict] = list(data["images"])
        self.image_ids: list[int] = [img["id"] for img in self.images]
        self._check_files_exist()
        self.box_report: Counter = Counter()  # crowd / degenerate / outside / clipped box counts
        self._first_skipped: dict[str, int] = {}  # reason -> first annotation id, for the warning
        self._targets = [self._training_boxes(img) for img in self.images]
        self._warn_skipped()

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.images)

    def _check_files_exist(self) -> None:
        present = set(os.listdir(self.image_dir))
        missing = [
            img["file_name"]
            for img in self.images
            if img["file_name"] not in present and not (self.image_dir / img["file_name"]).is_file()
        ]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.images)} images listed in {self.ann_file.name} are missing "
                f"from {self.image_dir} (e.g. {missing[0]!r}); check data.root and the split names"
            )

    def _training_boxes(self, img: dict) -> tuple[np.ndarray, np.ndarray]:
        """(K, 4) float32 xyxy boxes clipped to the image and (K,) int64 labels; crowd and bad boxes out."""
        width, height = float(img["width"]), float(img["height"])
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(img["id"], []):
            if ann.get("iscrowd", 0):
                self.box_report["crowd"] += 1
                continue
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                self.box_report["degenerate"] += 1
                self._first_skipped.setdefault("degenerate", ann["id"])
                continue
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 <= x0 or y1 <= y0:
                self.box_report["outside"] += 1
                self._first_skipped.setdefault("outside", ann["id"])
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                self.box_report["clipped"] += 1
            boxes.append((x0, y0, x1, y1))
            labels.append(self.cat_id_to_label[ann["category_id"]])
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)

    def _warn_skipped(self) -> None:
        """One warning when boxes were skipped; clipping alone (common in real COCO) is only logged."""
        report = self.box_report
        if report["degenerate"] or report["outside"]:
            log.warning(
                "%s: skipped %d boxes with zero/negative size (first: annotation id %s) and %d wholly "
                "outside their image (first: annotation id %s); clipped %d partly outside",
                self.ann_file,
                report["degenerate"],
                self._first_skipped.get("degenerate"),
                report["outside"],
                self._first_skipped.get("outside"),
                report["clipped"],
            )
        elif report["clipped"]:
            log.info("%s: clipped %d boxes partly outside their image", self.ann_file, report["clipped"])

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample `index`; DataError naming the file when it cannot be used."""
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as raw:
                raw.load()  # decode now: truncated or corrupt bytes fail here
                image = to_rgb(raw)
                if image is raw:
                    image = raw.copy()
        except FileNotFoundError:
            raise DataError(f"image file {path} is missing; restore it or remove it from {self.ann_file}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {path} ({e}); replace it or remove it from {self.ann_file}") from None
        if image.size != (info["width"], info["height"]):
            raise DataError(
                f"image {path} is {image.size[0]}x{image.size[1]} but {self.ann_file.name} says "
                f"{info['width']}x{info['height']}; images and annotations do not match"
            )
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = self.load_image(index)
        boxes, labels = self._targets[index]
        orig_size = (image.size[1], image.size[0])
        if self.transform is None:
            tensor, scale = to_tensor(image), 1.0
        else:
            tensor, boxes, scale = self.transform(image, boxes)
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),  # (K, 4)
            "labels": torch.from_numpy(labels.copy()),  # (K,)
            "image_id": int(self.image_ids[index]),
            "orig_size": orig_size,
            "scale": float(scale),
        }
        return tensor, target


# ----------------------------------------------------------------------------- config entry points


def resolve_data_root(cfg_data: Mapping[str, Any] | Any, cache_dir: str | os.PathLike | None = None) -> Path:
    """``data.root``, or the generated synthetic set when ``data.name`` is synthetic and root is null."""
    root = cfg_data.get("root", None)
    name = cfg_data.get("name", None)
    if root is None or str(root).strip() == "":
        if name == "synthetic":
            from detector.data.synthetic import ensure_synthetic

            return ensure_synthetic(cfg_data, cache_dir)
        raise DataError(
            f"data.root is not set for data={name}: pass data.root=/path/to/dataset "
            "(a folder holding train2017/, val2017/ and annotations/)"
        )
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; pass data.root=<dataset folder>")
    return path


def split_paths(cfg_data: Mapping[str, Any] | Any, root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` ("train" or "val") under `root`."""
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}: use train or val")
    split_name = cfg_data.get(f"{split}_split", None)
    if not split_name:
        raise DataError(f"data.{split}_split is not set: name the {split} folder (e.g. {split}2017)")
    image_dir = str(cfg_data.get("image_dir", None) or DEFAULT_IMAGE_DIR).format(split=split_name)
    ann_file = str(cfg_data.get("ann_file", None) or DEFAULT_ANN_FILE).format(split=split_name)
    return root / image_dir, root / ann_file


def check_data_paths(cfg_data: Mapping[str, Any] | Any, splits: tuple[str, ...] = ("train", "val")) -> None:
    """The folders and annotation files of ``splits`` exist (DataError otherwise), checked without
    reading them: for commands that create output before they open the data (a search's run
    directory). The generated synthetic set (``data.root`` null) is not checked: it is made on demand."""
    root = cfg_data.get("root", None)
    if (root is None or str(root).strip() == "") and cfg_data.get("name", None) == "synthetic":
        return
    root = resolve_data_root(cfg_data)
    for split in splits:
        image_dir, ann_file = split_paths(cfg_data, root, split)
        if not image_dir.is_dir():
            raise DataError(f"image folder {image_dir} does not exist; check data.root and the split names")
        if not ann_file.is_file():
            raise DataError(f"annotation file {ann_file} does not exist; check data.root and the split names")


def build_dataset(
    cfg_data: Mapping[str, Any] | Any,
    split: str,
    train: bool,
    cache_dir: str | os.PathLike | None = None,
    uint8_images: bool = False,
) -> CocoDetection:
    """The `split` dataset of a data config, with the training (`train`) or evaluation transform.

    ``uint8_images``: samples carry uint8 pixels instead of float32 in [0, 1] (see
    detector.data.transforms; the model accepts both).
    """
    transform = build_transform(cfg_data, train, uint8_images)
    root = resolve_data_root(cfg_data, cache_dir)
    image_dir, ann_file = split_paths(cfg_data, root, split)
    dataset = CocoDetection(image_dir, ann_file, transform)
    expected = cfg_data.get("num_classes", None)
    if expected is not None and int(expected) != dataset.num_classes:
        raise DataError(
            f"data.num_classes={expected} but {ann_file.name} has {dataset.num_classes} categories; "
            f"pass data.num_classes={dataset.num_classes}"
        )
    return dataset


def build_loader(
    cfg_data: Mapping[str, Any] | Any,
    split: str,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    distributed: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> DataLoader:
    """A DataLoader of ``(list of images, list of targets)`` batches over `build_dataset`.

    `train` shuffles (seeded by `seed`) and augments; otherwise order is the annotation file's.
    `distributed` uses a DistributedSampler (call ``loader.sampler.set_epoch(epoch)`` each epoch).
    The last partial batch is kept. The dataset is ``loader.dataset`` (label mapping, COCO index).
    """
    dataset = build_dataset(cfg_data, split, train, cache_dir)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=int(seed))
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers > 0,
        drop_last=False,
    )
