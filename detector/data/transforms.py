"""Detection transforms (resize by short side, horizontal flip) and batching helpers.

Contract with the model: images leave the loader as float32 RGB tensors in [0, 1], shape
(3, H, W), NOT normalised (per-backbone normalisation is the model's job), each at its own size;
`collate` keeps them as a list and the model pads them, with `pad_batch` if it likes. A transform
built with ``uint8_images=True`` hands over the uint8 pixels (0..255) instead: 4x fewer bytes to
pin and copy to the GPU, where the model divides by 255 -- bit-identical to `to_tensor`'s float32
image (the training loader uses this; see detector.model.fcos.FCOS.normalize).

Boxes are float32 (K, 4) arrays in xyxy pixel coordinates. After `DetectionTransform` they are in
the resized image's pixels: ``resized = original * scale`` (one scale for both axes; the resized
size is ``round(h * scale), round(w * scale)``, so the two can disagree by under half a pixel),
clipped to the resized image.

Randomness (the short-side choice and the flip) comes from torch's global generator, which
DataLoader seeds per worker from the loader's generator, so a seeded loader is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from detector.data.errors import DataError


def resize_scale(height: int, width: int, short_side: int | None, max_size: int | None) -> float:
    """Scale that brings the short side to `short_side` without the long side passing `max_size`.

    `short_side` None keeps the native resolution (scale 1), still capped by `max_size`.
    """
    scale = 1.0 if short_side is None else short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def resize(image: Image.Image, boxes: np.ndarray, scale: float) -> tuple[Image.Image, np.ndarray]:
    """Resize a PIL image by `scale` (bilinear) and its (K, 4) xyxy boxes with it."""
    if scale == 1.0:
        return image, boxes
    width, height = image.size
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    boxes = boxes * np.float32(scale)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
    return image, boxes


def hflip(image: Image.Image, boxes: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Mirror a PIL image left-right and its (K, 4) xyxy boxes: x -> width - x."""
    width = image.size[0]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


def to_tensor(image: Image.Image, uint8: bool = False) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor in [0, 1] (uint8 0..255 with ``uint8``)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # (H, W, 3)
    if uint8:
        return pixels.permute(2, 0, 1).contiguous()
    return unit_float(pixels.permute(2, 0, 1))


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (a contiguous copy; float32 images pass through unchanged).

    The one conversion rule for both sides: the loader's float32 images and the model's
    conversion of uint8 images on the GPU give the same bits (IEEE division is correctly rounded).
    """
    if image.dtype != torch.uint8:
        return image
    return image.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


class DetectionTransform:
    """Random short side from `short_sides` (None = native size), cap at `max_size`, random flip.

    Called as ``transform(image, boxes) -> (image tensor (3, H, W), boxes (K, 4), scale)``.
    """

    def __init__(self, short_sides: Sequence[int] | None, max_size: int | None, flip_prob: float = 0.0,
                 uint8_images: bool = False):
        if short_sides is not None and (len(short_sides) == 0 or min(short_sides) <= 0):
            raise DataError(f"short sides {list(short_sides)} must be a non-empty list of positive ints or null")
        if max_size is not None and max_size <= 0:
            raise DataError(f"max_size={max_size} must be positive or null")
        if not 0.0 <= flip_prob <= 1.0:
            raise DataError(f"flip_prob={flip_prob} must be in [0, 1]")
        self.short_sides = None if short_sides is None else [int(s) for s in short_sides]
        self.max_size = None if max_size is None else int(max_size)
        self.flip_prob = float(flip_prob)
        self.uint8_images = bool(uint8_images)

    def __call__(self, image: Image.Image, boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray, float]:
        short = None
        if self.short_sides is not None:
            short = self.short_sides[int(torch.randint(len(self.short_sides), ()).item())]
        scale = resize_scale(image.size[1], image.size[0], short, self.max_size)
        image, boxes = resize(image, boxes, scale)
        if self.flip_prob > 0 and torch.rand(()).item() < self.flip_prob:
            image, boxes = hflip(image, boxes)
        return to_tensor(image, self.uint8_images), boxes, scale

    def __repr__(self) -> str:
        return (f"DetectionTransform(short_sides={self.short_sides}, max_size={self.max_size}, "
                f"flip_prob={self.flip_prob}, uint8_images={self.uint8_images})")


def _short_sides(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [int(value)]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise DataError(f"data.{key}={value!r} must be a list of ints (short sides) or null") from None


def build_transform(cfg_data: Mapping[str, Any] | Any, train: bool, uint8_images: bool = False) -> DetectionTransform:
    """Training (`train_sizes`, flip `flip_prob`) or evaluation (`val_size`, no flip) transform."""
    max_size = cfg_data.get("max_size", None)
    if train:
        sizes = _short_sides(cfg_data.get("train_sizes", None), "train_sizes")
        return DetectionTransform(sizes, max_size, float(cfg_data.get("flip_prob", 0.5)), uint8_images)
    return DetectionTransform(_short_sides(cfg_data.get("val_size", None), "val_size"), max_size, 0.0, uint8_images)


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]); images keep their own sizes."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def pad_batch(images: Sequence[torch.Tensor], size_divisible: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad (3, h, w) images at the bottom/right into one (N, 3, H, W) tensor.

    H and W are the largest h and w rounded up to a multiple of `size_divisible`. Returns the
    batch and each image's (h, w) before padding.
    """
    if len(images) == 0:
        raise ValueError("pad_batch needs at least one image")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = math.ceil(max(h for h, _ in sizes) / size_divisible) * size_divisible
    width = math.ceil(max(w for _, w in sizes) / size_divisible) * size_divisible
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))  # (N, C, H, W)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w].copy_(im)
    return batch, sizes
