"""``python -m detector infer ckpt=<file> images=<file|dir> out=<dir>``: detections drawn on images.

The checkpoint holds the architecture code and the config it was trained with, so ``arch=`` is
optional (when typed it must match). Each image is resized as the checkpoint's validation
transform says (``data.val_size`` / ``data.max_size``), run through the detector, and its boxes
are mapped back to the file's pixels. Written into ``out``:

- ``<image stem>.png``: the image with every detection scoring at least ``score_thresh`` drawn
  as a box labelled ``<class name> <score>``;
- ``detections.json``: ``[{"file", "width", "height", "detections": [{"box": [x1, y1, x2, y2],
  "score", "label", "class_name"}]}]`` with the same threshold. ``label`` is the dataset's
  category id (as in the annotation file and ``eval_detections.json``), not the model's 0-based
  class index.

Images are read with PIL (JPEG, PNG, BMP, WebP, TIFF). In a folder, subfolders and files of other
suffixes are skipped with one warning naming how many; an unreadable image is skipped with a
warning (the command fails in one line only when no image at all can be read). Existing files in
``out`` are never overwritten: the command refuses before any work (:func:`detector.output_path.output_folder`).
The outputs are written into a hidden staging folder inside ``out`` and moved into place at the
end, so a failed run leaves nothing in ``out`` that would block the retry.
"""
from __future__ import annotations

import colorsys
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from detector.data.coco import to_rgb
from detector.data.transforms import build_transform
from detector.engine.distributed import autocast_dtype, select_device
from detector.errors import UserError
from detector.commands.eval import checked_checkpoint
from detector.engine.evaluate import model_from_checkpoint
from detector.output_path import output_folder, write_error
from detector.engine.run_dir import write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECTIONS_JSON = "detections.json"


class InferError(UserError):
    """Bad images= or out= for inference."""


def list_images(path: str | Path) -> list[Path]:
    """An image file, or the image files (by suffix) directly inside a folder, sorted."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = sorted(path.iterdir())
        found = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise InferError(f"images={path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        folders = [p for p in entries if p.is_dir()]
        others = [p for p in entries if p not in found and p not in folders and not p.name.startswith(".")]
        if folders or others:
            example = (others or folders)[0].name
            log.warning("images=%s: skipped %d subfolders (not searched) and %d files without an image suffix "
                        "(e.g. %s)", path, len(folders), len(others), example)
        return found
    raise InferError(f"images={path} does not exist; pass an image file or a folder of images")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as raw:
            raw.load()
            return to_rgb(raw).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InferError(f"cannot read image {path} ({err}); pass readable image files") from None


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each ``{"box", "score", "label", "class_name"}`` drawn on it."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(min(canvas.size) / 200))
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        colour = class_colour(int(det["label"]))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{det['class_name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        lift = bottom - top + 2
        y_text = y1 - lift if y1 - lift >= 0 else y1
        draw.rectangle((x1, y_text, x1 + right - left + 4, y_text + lift), fill=colour)
        draw.text((x1 + 2, y_text + 1), text, fill=(0, 0, 0), font=font)
    return canvas


@torch.inference_mode()
def detect(model: torch.nn.Module, image: Image.Image, transform, class_names: Sequence[str],
           score_thresh: float, amp_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Detections of one PIL image in its own pixels, best first, scores >= ``score_thresh``."""
    device = next(model.parameters()).device
    tensor, _, scale = transform(image, torch.zeros(0, 4).numpy())  # (3, h, w)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = model([tensor.to(device)])[0]
    boxes = output["boxes"].float().cpu() / scale  # (M, 4) in file pixels
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.size[0])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.size[1])
    found = []
    for box, score, label in zip(boxes.tolist(), output["scores"].float().tolist(), output["labels"].tolist()):
        if score >= score_thresh:
            name = class_names[label] if label < len(class_names) else str(label)
            found.append({"box": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label),
                          "class_name": name})
    return found


def infer_command(cfg: Any) -> list[dict[str, Any]]:
    """Run the checkpoint on ``images`` and write drawn PNGs and ``detections.json`` into ``out``."""
    if cfg.get("images", None) is None or not str(cfg.images).strip():
        raise InferError("images is not set; pass images=<an image file or a folder of images>")
    if cfg.get("out", None) is None or not str(cfg.out).strip():
        raise InferError("out is not set; pass out=<folder for the drawn images and detections.json>")
    payload = checked_checkpoint(cfg)
    files = list_images(str(cfg.images))
    if len({f.stem for f in files}) != len(files):
        raise InferError(f"images={cfg.images} holds files with the same name but different suffixes; "
                         "their drawings would collide in out")
    out = output_folder(cfg.out, "out", [f"{f.stem}.png" for f in files] + [DETECTIONS_JSON])
    device = select_device(str(cfg.device))
    model = model_from_checkpoint(payload, device)
    trained_cfg = OmegaConf.create(payload["config"])
    transform = build_transform(trained_cfg.data, train=False)
    num_classes = int(trained_cfg.data.num_classes)
    class_names = list(payload.get("class_names") or [str(i) for i in range(num_classes)])
    cat_ids = [int(c) for c in payload.get("label_to_cat_id") or range(num_classes)]
    amp = autocast_dtype(str(cfg.train.amp), device)
    staging = out / f".infer-partial-{os.getpid()}"
    records, skipped, reasons = [], [], []
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for path in files:
            try:
                image = read_image(path)
            except InferError as err:
                log.warning("skipped %s", err)
                skipped.append(path.name)
                reasons.append(str(err))
                continue
            found = detect(model, image, transform, class_names, float(cfg.score_thresh), amp)
            for det in found:  # the dataset's category id, as in the annotation file and eval JSON
                det["label"] = cat_ids[det["label"]] if det["label"] < len(cat_ids) else det["label"]
            draw_detections(image, found).save(staging / f"{path.stem}.png")
            records.append({"file": path.name, "width": image.size[0], "height": image.size[1], "detections": found})
            print(f"{path.name}: {len(found)} detections")
        if not records:
            raise InferError(reasons[0] if len(files) == 1 else f"none of the {len(files)} images could be read "
                             f"(e.g. {reasons[0]})")
        write_json(staging / DETECTIONS_JSON, records)
        for written in sorted(staging.iterdir()):
            os.replace(written, out / written.name)
    except OSError as err:
        raise write_error(out, "out", err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    note = f" (skipped {len(skipped)} unreadable: {', '.join(skipped[:3])})" if skipped else ""
    print(f"wrote {len(records)} images and {DETECTIONS_JSON} to {out}{note}")
    return records
