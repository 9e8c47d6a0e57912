"""Seeded synthetic shapes dataset, written in COCO format.

Layout of a generated dataset (the COCO convention ``<root>/<split>/`` for images and
``<root>/annotations/instances_<split>.json`` for boxes, with splits ``train`` and ``val`` where
real COCO has ``train2017`` and ``val2017``; the loader reads both through ``data.train_split`` /
``data.val_split``)::

    <root>/train/000001.jpg ...
    <root>/val/000001.jpg ...
    <root>/annotations/instances_train.json
    <root>/annotations/instances_val.json
    <root>/params.json            the generator parameters (for humans; not read back)

What an image holds:

- six classes of shapes (`CLASS_NAMES`, category ids 1..6): filled ellipse, rotated rectangle,
  triangle, five-point star, ring, cross; each solid, striped or noisy in a colour that
  contrasts with the background;
- a cluttered background: a flat colour or a gradient, pixel noise, random lines and irregular
  blobs that are not objects;
- 0 to ``max_objects`` objects, sized log-uniformly from ``min_object_size`` px to 90% of the
  image's short side, aspect ratios 0.6 to 1.65;
- image sides drawn independently from [``image_min_side``, ``image_max_side``]; every
  ``large_every``-th image (index 0, 16, 32, ... by default) is large, 704 to 800 px on its
  long side, and its first object is huge (80-95% of that long side), so that every FCOS level
  P3-P7 gets positives under the ranges [0, 64, 128, 256, 512, inf] at native resolution.

Occlusion: objects are drawn largest first, so smaller ones lie on top. A placement that would
cover more than half of the box of an object already drawn is retried (10 tries) and otherwise
dropped, so every object stays at least roughly half visible; a box is always the object's full
extent (occluded parts included), never just its visible pixels. Objects lie wholly inside the
image. ``area`` in the annotations is the box area (w * h); ``iscrowd`` is always 0.

Determinism: image i of a split draws from ``numpy.random.default_rng([seed, split, i, stream])``,
so its content depends on (seed, split, i) and the generator parameters only, not on how many
images are generated or on which worker renders it. The same parameters give byte-identical
annotation files and identical image files (JPEG bytes with the same Pillow build).

Drawing lives in `detector.data.shapes`; this module chooses layouts and writes files.
Public entry points: `write_dataset` (write into a folder), `ensure_synthetic` (generate once
into the cache, keyed by a hash of the parameters, atomically), `write_atomically` (what
``python -m detector synth out=<dir>``, :mod:`detector.commands.synth`, calls), `sample_layout`
(the boxes of one image without rendering it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.cache_dir import resolve_cache_dir
from detector.data.errors import DataError
from detector.data.shapes import CLASS_NAMES, ImageLayout, ObjectLayout, render_image

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when rendering or layout changes: it is part of the cache key
SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
_LAYOUT_STREAM, _RENDER_STREAM = 0, 1
_MAX_COVERED_FRACTION = 0.5  # of an earlier object's box that a later object may cover
_PLACEMENT_TRIES = 10


@dataclass(frozen=True)
class SynthSpec:
    """Generator parameters; every field is part of the cache key."""

    num_train: int = 512
    num_val: int = 128
    seed: int = 0
    image_min_side: int = 192
    image_max_side: int = 512
    large_every: int = 16  # every k-th image is large with a huge object; 0 = none
    large_max_side: int = 800
    max_objects: int = 10
    min_object_size: int = 8
    image_format: str = "jpg"  # "jpg" or "png"

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise DataError(f"synthetic data: {what}")

        need(self.num_train >= 0 and self.num_val >= 0, "num_train and num_val must be >= 0")
        need(self.num_train + self.num_val > 0, "num_train + num_val must be > 0")
        need(self.min_object_size >= 2, "min_object_size must be >= 2")
        need(
            self.image_min_side >= 4 * self.min_object_size,
            f"image_min_side={self.image_min_side} must be >= 4 * min_object_size",
        )
        need(self.image_max_side >= self.image_min_side, "image_max_side must be >= image_min_side")
        need(self.large_every >= 0, "large_every must be >= 0 (0 turns large images off)")
        need(
            self.large_every == 0 or self.large_max_side >= self.image_max_side,
            "large_max_side must be >= image_max_side",
        )
        need(0 <= self.max_objects <= 100, "max_objects must be in 0..100")
        need(self.image_format in ("jpg", "png"), f"image_format={self.image_format!r}: use jpg or png")

    def count(self, split: str) -> int:
        return self.num_train if split == "train" else self.num_val

    def cache_key(self) -> str:
        """Hex digest of the parameters and the generator version (the cache folder name)."""
        payload = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def spec_from_config(cfg_data: Mapping[str, Any] | Any) -> SynthSpec:
    """A `SynthSpec` from the generator keys of a data config; other keys are ignored."""
    values = {}
    for field in dataclasses.fields(SynthSpec):
        value = cfg_data.get(field.name, None)
        if value is not None:
            values[field.name] = str(value) if field.type == "str" else int(value)
    return SynthSpec(**values)


def _rng(spec: SynthSpec, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_CODE[split], index, stream])


def _is_large(spec: SynthSpec, index: int) -> bool:
    return spec.large_every > 0 and index % spec.large_every == 0


def _overlap_fraction(box: tuple[float, ...], earlier: tuple[float, ...]) -> float:
    """Fraction of `earlier`'s area that `box` covers."""
    iw = min(box[2], earlier[2]) - max(box[0], earlier[0])
    ih = min(box[3], earlier[3]) - max(box[1], earlier[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((earlier[2] - earlier[0]) * (earlier[3] - earlier[1]))


def sample_layout(spec: SynthSpec, split: str, index: int) -> ImageLayout:
    """Image size and object boxes of image `index` of `split` (what `write_dataset` renders)."""
    rng = _rng(spec, split, index, _LAYOUT_STREAM)
    large = _is_large(spec, index)
    if large:
        long_side = int(rng.integers(int(0.88 * spec.large_max_side), spec.large_max_side + 1))
        short_side = int(rng.integers(spec.image_max_side, int(0.8 * spec.large_max_side) + 1))
        short_side = min(short_side, long_side)
        landscape = bool(rng.random() < 0.5)
        width, height = (long_side, short_side) if landscape else (short_side, long_side)
    else:
        width = int(rng.integers(spec.image_min_side, spec.image_max_side + 1))
        height = int(rng.integers(spec.image_min_side, spec.image_max_side + 1))

    sizes = []  # (w, h, label)
    num_objects = int(rng.integers(0, spec.max_objects + 1))
    if large:
        long_obj = rng.uniform(0.80, 0.95) * max(width, height)
        short_obj = rng.uniform(0.45, 0.90) * min(width, height)
        w, h = (long_obj, short_obj) if width >= height else (short_obj, long_obj)
        sizes.append((w, h, int(rng.integers(len(CLASS_NAMES)))))
        num_objects = max(num_objects - 1, 0)
    max_size = 0.9 * min(width, height)
    for _ in range(num_objects):
        size = math.exp(rng.uniform(math.log(spec.min_object_size), math.log(max_size)))
        aspect = math.exp(rng.uniform(-0.5, 0.5))
        w = min(max(size * math.sqrt(aspect), spec.min_object_size), width - 2)
        h = min(max(size / math.sqrt(aspect), spec.min_object_size), height - 2)
        sizes.append((w, h, int(rng.integers(len(CLASS_NAMES)))))

    sizes.sort(key=lambda s: -s[0] * s[1])  # largest first: smaller objects lie on top
    placed: list[ObjectLayout] = []
    for w, h, label in sizes:
        for _ in range(_PLACEMENT_TRIES):
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_overlap_fraction(box, p.box) <= _MAX_COVERED_FRACTION for p in placed):
                placed.append(ObjectLayout(label, box))
                break
    return ImageLayout(width, height, tuple(placed))


# ----------------------------------------------------------------------------- writing


def _coco_box(box: tuple[float, ...], width: int, height: int) -> list[float]:
    x0, y0 = max(round(box[0], 2), 0.0), max(round(box[1], 2), 0.0)
    x1, y1 = min(round(box[2], 2), float(width)), min(round(box[3], 2), float(height))
    return [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]


def _write_one(job: tuple[SynthSpec, str, int, str]) -> tuple[dict, list[dict]]:
    """Render and save one image; return its COCO image entry and annotations (ids unset)."""
    spec, split, index, image_dir = job
    layout = sample_layout(spec, split, index)
    image_id = index + 1
    file_name = f"{image_id:06d}.{spec.image_format}"
    image = render_image(layout, _rng(spec, split, index, _RENDER_STREAM))
    if spec.image_format == "jpg":
        image.save(os.path.join(image_dir, file_name), quality=90)
    else:
        image.save(os.path.join(image_dir, file_name), compress_level=1)
    entry = {"id": image_id, "file_name": file_name, "width": layout.width, "height": layout.height}
    anns = []
    for obj in layout.objects:
        bbox = _coco_box(obj.box, layout.width, layout.height)
        anns.append(
            {
                "image_id": image_id,
                "category_id": obj.label + 1,
                "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2),
                "iscrowd": 0,
            }
        )
    return entry, anns


def _map_jobs(jobs: list, workers: int, progress: bool, desc: str) -> list:
    """`_write_one` over jobs, in order, on `workers` processes (fork) or in-process."""
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc=desc, disable=None if progress else True, leave=False)  # None: tty only
    if workers <= 1 or len(jobs) < 32 or "fork" not in multiprocessing.get_all_start_methods():
        return [_write_one(job) for job in tqdm(jobs, **bar)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(_write_one, jobs, chunksize=8), **bar))


def write_dataset(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    seed: int,
    *,
    workers: int = 2,
    progress: bool = False,
    **spec_fields: Any,
) -> Path:
    """Write the synthetic dataset into `out_dir` (created; must not hold a dataset already).

    `spec_fields` are the other `SynthSpec` fields (image_min_side, large_every, ...).
    Returns `out_dir`. Output does not depend on `workers`.
    """
    spec = SynthSpec(num_train=num_train, num_val=num_val, seed=seed, **spec_fields)
    root = Path(out_dir)
    if (root / "annotations").exists():
        raise DataError(f"{root} already holds a dataset (annotations/); choose an empty folder")
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    for split in SPLITS:
        image_dir = root / split
        image_dir.mkdir()
        jobs = [(spec, split, i, str(image_dir)) for i in range(spec.count(split))]
        results = _map_jobs(jobs, workers, progress, f"synthetic {split}")
        images, annotations = [], []
        for entry, anns in results:
            images.append(entry)
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, **ann})
        dataset = {
            "info": {"description": "NAS-FCOS synthetic shapes", "version": str(GENERATOR_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dataset, f, separators=(",", ":"))
    params = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(spec)}
    (root / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return root


def write_atomically(spec: SynthSpec, final: Path, workers: int, progress: bool) -> None:
    """Write into a temp sibling of `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("num_train", "num_val", "seed")}
    try:
        write_dataset(tmp, spec.num_train, spec.num_val, spec.seed, workers=workers, progress=progress, **fields)
        os.rename(tmp, final)
    except OSError:
        if not (final / "annotations").is_dir():  # not a lost race with another writer
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic(
    cfg_data: Mapping[str, Any] | Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """The root of the synthetic dataset described by `cfg_data`, generating it on first use.

    Lives in ``<cache_dir>/synthetic/<hash of the generator parameters>/`` (cache_dir None =
    `default_cache_dir()`); written to a temp folder and renamed, so a crash or a concurrent
    writer never leaves a half-written dataset behind.
    """
    spec = spec_from_config(cfg_data)
    final = resolve_cache_dir(cache_dir) / "synthetic" / spec.cache_key()
    if (final / "annotations").is_dir():
        return final
    log.info("generating synthetic dataset (%d train / %d val) into %s", spec.num_train, spec.num_val, final)
    write_atomically(spec, final, workers, progress)
    return final


