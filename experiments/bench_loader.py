"""Training data loader throughput with real JPEG decoding of COCO-sized images.

Writes ``--images`` synthetic JPEGs the size of COCO's (mostly 640x480 landscape, some 640x427
and 480x640; smooth shapes and texture so they compress like photos, ~50-150 KB) with a COCO
instances file into a temporary folder, then measures images/s of

- ``build_loader``: ``detector.data.coco.build_loader`` (training transform: resize to short
  side 800 / long side <= 1333, flip), as evaluation and simple scripts use it;
- ``train stream``: ``detector.data.stream.build_train_stream``, what ``python -m detector train``
  iterates: uint8 images (the model converts them on the GPU), ``pin_memory`` on CUDA machines;
- ``train stream f32`` (``--float-stream``): the same with float32 images, as before uint8 (the
  main process pinning 4x the bytes was the bottleneck: 1.27x the training speed on the H100);

for each ``--workers`` count, after ``--warmup-batches`` untimed batches (worker start-up). It also
times one image's stages in the main process (decode, resize, to-tensor) and pinning a batch, and,
given the training speed (``--train-images-per-s`` or the JSON of ``python -m detector bench
format=json`` via ``--bench-json``), prints the loader's margin over it (the goal: >= 2x).

Without pycocotools the COCO dataset class cannot be imported; the script then runs the same
per-image code (PIL decode, ``detector.data.transforms``) through a small JSON-reading dataset and
says so.

    python experiments/bench_loader.py --workers 2 4 8 16 --bench-json $OUT/bench_fcos.json
    python experiments/bench_loader.py --images 32 --workers 0 2 --batches 2   # smoke run
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

SPLIT = "train2017"
NUM_CLASSES = 80
COCO_SIZES = ((640, 480), (640, 480), (640, 480), (640, 480), (640, 427), (480, 640))  # (w, h), COCO-like mix


def data_config(root: Path) -> dict[str, Any]:
    """The conf/data/coco.yaml settings pointed at ``root``."""
    return {"name": "coco", "root": str(root), "train_split": SPLIT, "val_split": SPLIT, "image_dir": "{split}",
            "ann_file": "annotations/instances_{split}.json", "num_classes": NUM_CLASSES, "train_sizes": [800],
            "val_size": 800, "max_size": 1333, "flip_prob": 0.5}


def _write_image(job: tuple[int, int, int, str, int]) -> list[list[float]]:
    """One photo-like JPEG; returns its boxes [x, y, w, h]."""
    index, width, height, path, quality = job
    rng = np.random.default_rng(index)
    base = rng.integers(0, 256, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BICUBIC)  # smooth background
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(4, 11))):
        w, h = (int(v) for v in rng.integers(16, max(17, min(width, height) // 2), size=2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=color)
        boxes.append([float(x), float(y), float(w), float(h)])
    texture = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.asarray(image.filter(ImageFilter.SMOOTH), dtype=np.float32) + texture
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
    return boxes


def write_dataset(root: Path, num_images: int, quality: int = 90, processes: int | None = None) -> float:
    """JPEGs + annotations/instances_train2017.json under ``root``; returns the mean file size in KB."""
    image_dir = root / SPLIT
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    jobs = []
    for index in range(num_images):
        width, height = COCO_SIZES[index % len(COCO_SIZES)]
        jobs.append((index, width, height, str(image_dir / f"{index:012d}.jpg"), quality))
    processes = processes or os.cpu_count() or 1
    if processes == 1:
        all_boxes = [_write_image(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            all_boxes = pool.map(_write_image, jobs, chunksize=8)
    images, annotations = [], []
    for (index, width, height, path, _), boxes in zip(jobs, all_boxes):
        images.append({"id": index + 1, "file_name": Path(path).name, "width": width, "height": height})
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "bbox": box, "iscrowd": 0,
                                "category_id": 1 + len(annotations) % NUM_CLASSES, "area": box[2] * box[3]})
    categories = [{"id": k + 1, "name": f"class{k + 1}"} for k in range(NUM_CLASSES)]
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return statistics.mean(os.path.getsize(j[3]) for j in jobs) / 1024


def _transforms_module():
    """detector.data.transforms, importable even when detector.data's __init__ (pycocotools) is not."""
    try:
        return importlib.import_module("detector.data.transforms")
    except ImportError:
        package = types.ModuleType("detector.data")
        package.__path__ = [str(ROOT / "detector" / "data")]
        sys.modules["detector.data"] = package
        return importlib.import_module("detector.data.transforms")


class JsonDetection(torch.utils.data.Dataset):
    """Fallback without pycocotools: the per-image work of CocoDetection (decode, transform)."""

    def __init__(self, root: Path, cfg_data: dict[str, Any], uint8_images: bool = False) -> None:
        self.transforms = _transforms_module()
        data = json.loads((root / "annotations" / f"instances_{SPLIT}.json").read_text())
        self.images = data["images"]
        self.image_dir = root / SPLIT
        by_image: dict[int, list] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.targets = []
        for img in self.images:
            anns = by_image.get(img["id"], [])
            boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                for a in anns], dtype=np.float32).reshape(-1, 4)
            self.targets.append((boxes, np.asarray([a["category_id"] - 1 for a in anns], dtype=np.int64)))
        self.transform = self.transforms.build_transform(cfg_data, train=True, uint8_images=uint8_images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        with Image.open(self.image_dir / self.images[index]["file_name"]) as raw:
            image = raw.convert("RGB")
        boxes, labels = self.targets[index]
        tensor, boxes, scale = self.transform(image, boxes)
        return tensor, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels.copy()),
                        "image_id": self.images[index]["id"], "scale": scale}


def build_dataset(root: Path, uint8_images: bool = False):
    """(dataset, how): the real CocoDetection when pycocotools imports, else the fallback."""
    cfg = data_config(root)
    try:
        from detector.data.coco import build_dataset as coco_dataset
    except ImportError as err:
        return JsonDetection(root, cfg, uint8_images), f"fallback JsonDetection ({err})"
    return coco_dataset(cfg, "train", train=True, uint8_images=uint8_images), "detector.data.coco.CocoDetection"


def measure(loader, warmup: int, batches: int) -> float:
    """Images/s over ``batches`` batches after ``warmup`` untimed ones (epochs restart as needed)."""
    iterator = iter(loader)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    for _ in range(warmup):
        next_batch()
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        imgs, _targets = next_batch()
        images += len(imgs)
    seconds = time.perf_counter() - start
    del iterator
    return images / seconds


def stage_times(dataset, count: int = 16) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process (no workers)."""
    transforms = _transforms_module()
    stats: dict[str, list[float]] = {"decode": [], "resize": [], "to_tensor float32": [], "to_tensor uint8": []}
    image_dir = Path(dataset.image_dir)
    for info in dataset.images[:count]:
        t0 = time.perf_counter()
        with Image.open(image_dir / info["file_name"]) as raw:
            image = raw.convert("RGB")
        t1 = time.perf_counter()
        scale = transforms.resize_scale(image.size[1], image.size[0], 800, 1333)
        resized, _ = transforms.resize(image, np.zeros((0, 4), np.float32), scale)
        t2 = time.perf_counter()
        transforms.to_tensor(resized)
        t3 = time.perf_counter()
        torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
        t4 = time.perf_counter()
        for key, value in zip(stats, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            value_ms = value * 1000.0
            stats[key].append(value_ms)
    return {k: statistics.median(v) for k, v in stats.items()}


def pin_times(dataset, batch: int) -> dict[str, float]:
    """Milliseconds to pin one batch of float32 vs uint8 images (the main process does this)."""
    if not torch.cuda.is_available():
        return {}
    images = [dataset[i][0] for i in range(batch)]
    results = {}
    for name, tensors in (("float32", images), ("uint8", [(im * 255).to(torch.uint8) for im in images])):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            [t.pin_memory() for t in tensors]
            times.append((time.perf_counter() - start) * 1000.0)
        results[f"pin batch {name}"] = statistics.median(times)
    return results


def save(result: dict[str, Any], args: argparse.Namespace) -> None:
    """loader.json under --out (with the margin over training once the rows allow it)."""
    if not args.out:
        return
    speed = training_speed(args)
    streams = [r["images_per_s"] for r in result["rows"] if r["loader"] == "train stream"]
    if speed and streams:
        result["train_images_per_s"], result["margin"] = speed, max(streams) / speed
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "loader.json").write_text(json.dumps(result, indent=1))


def training_speed(args: argparse.Namespace) -> float | None:
    if args.train_images_per_s:
        return float(args.train_images_per_s)
    if args.bench_json and Path(args.bench_json).is_file():
        try:
            text = Path(args.bench_json).read_text().strip().splitlines()[-1]
            rows = json.loads(text)["rows"]
        except (ValueError, KeyError, IndexError):
            return None
        speeds = [r["train_images_per_s"] for r in rows if r.get("model") == "ours" and "train_images_per_s" in r]
        return max(speeds) if speeds else None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    parser.add_argument("--warmup-batches", type=int, default=3)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--dir", default=None, help="dataset folder (default: a temporary one, removed after)")
    parser.add_argument("--train-images-per-s", type=float, default=None)
    parser.add_argument("--bench-json", default=None, help="output of python -m detector bench format=json")
    parser.add_argument("--out", default=None, help="folder for loader.json")
    parser.add_argument("--float-stream", action="store_true", help="also time the train stream with float32 images")
    args = parser.parse_args(argv)
    if args.images < args.batch * (args.warmup_batches + 1):
        print(f"error: --images {args.images} is too few for batch {args.batch}; use at least "
              f"{args.batch * (args.warmup_batches + 1)}", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    cuda = torch.cuda.is_available()
    try:
        started = time.perf_counter()
        kb = write_dataset(root, args.images, args.quality)
        print(f"wrote {args.images} JPEGs (mean {kb:.0f} KB) to {root} in {time.perf_counter() - started:.1f} s; "
              f"{os.cpu_count()} CPUs, pin_memory={cuda}", flush=True)
        dataset, how = build_dataset(root)
        print(f"dataset: {how}")
        result: dict[str, Any] = {"images": args.images, "mean_kb": kb, "cpus": os.cpu_count(), "dataset": how,
                                  "stages_ms": stage_times(dataset), "rows": []}
        result.update(pin_times(dataset, args.batch))
        print("per image in one process (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result["stages_ms"].items()))
        from detector.data.stream import build_train_stream

        transforms = _transforms_module()
        stream_set, _ = build_dataset(root, uint8_images=True)  # what the training engine iterates
        kinds = ("build_loader", "train stream") + (("train stream f32",) if args.float_stream else ())
        for workers in args.workers:
            for kind in kinds:
                if kind == "build_loader":
                    try:
                        from detector.data.coco import build_loader
                        loader = build_loader(data_config(root), "train", args.batch, train=True, workers=workers, seed=0)
                    except ImportError:
                        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                                             num_workers=workers, collate_fn=transforms.collate,
                                                             persistent_workers=workers > 0)
                else:
                    source = stream_set if kind == "train stream" else dataset
                    loader = build_train_stream(source, args.batch, 0, 0, 1, 0, workers, pin_memory=cuda)
                rate = measure(loader, args.warmup_batches, args.batches)
                del loader
                result["rows"].append({"loader": kind, "workers": workers, "images_per_s": rate})
                print(f"{kind:<16} workers {workers:>3}: {rate:8.1f} images/s", flush=True)
                save(result, args)  # after every row: a timeout still leaves the rows so far
        speed = training_speed(args)
        if speed and any(r["loader"] == "train stream" for r in result["rows"]):
            best = max(r["images_per_s"] for r in result["rows"] if r["loader"] == "train stream")
            print(f"training consumes {speed:.1f} images/s; best train stream {best:.1f} images/s = "
                  f"{best / speed:.2f}x ({'meets' if best >= 2 * speed else 'BELOW'} the 2x goal)")
        save(result, args)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
