"""Drawing the synthetic shapes: what an image of the synthetic dataset looks like.

`render_image(layout, rng)` paints an `ImageLayout` (image size and object boxes, chosen by
`detector.data.synthetic.sample_layout`): a flat or gradient background with pixel noise,
clutter that is not an object (lines, irregular blobs), then each object in order, later ones on
top. An object fills its box exactly (its extreme points touch the box sides): an ellipse, a ring,
or a randomly rotated polygon (rectangle, triangle, five-point star, cross) stretched to the box;
solid, striped or noisy, in a colour chosen away from the background's mean colour.
Everything random comes from `rng`, so a seeded generator gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "rectangle", "triangle", "star", "ring", "cross")  # category id = index + 1


@dataclass(frozen=True)
class ObjectLayout:
    label: int  # contiguous 0..len(CLASS_NAMES)-1; category id is label + 1
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, inside the image


@dataclass(frozen=True)
class ImageLayout:
    width: int
    height: int
    objects: tuple[ObjectLayout, ...]  # in drawing order (largest first)


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour at least 120 (L1) away from `avoid` when that is found in 20 tries."""
    colour = rng.integers(0, 256, 3)
    for _ in range(20):
        if avoid is None or np.abs(colour - avoid).sum() >= 120:
            break
        colour = rng.integers(0, 256, 3)
    return colour


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 background and its mean colour."""
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if rng.random() < 0.5:  # flat
        image = np.broadcast_to(first.astype(np.int16), (height, width, 3)).copy()
    else:  # linear gradient along a random direction
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)  # (H, W) in [0, 1]
        image = (first + t[..., None] * (second - first)).astype(np.int16)
    amplitude = int(rng.integers(0, 30))
    if amplitude:
        image += rng.integers(-amplitude, amplitude + 1, (height, width, 1), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), image.reshape(-1, 3).mean(0)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Lines and irregular blobs that are not objects."""
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(int(rng.integers(0, 7))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 6))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(3, 30)
        n = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = radius * rng.uniform(0.3, 1.0, n)
        points = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))


def _unit_polygon(label_name: str, rng: np.random.Generator) -> np.ndarray:
    """(V, 2) vertices of a polygon class around the origin, randomly rotated."""
    if label_name == "rectangle":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif label_name == "triangle":
        a = np.array([90, 210, 330]) * math.pi / 180
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif label_name == "star":
        a = np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:  # cross: a plus sign with arms of half-width 0.3
        k = 0.3
        pts = np.array(
            [[-k, -1], [k, -1], [k, -k], [1, -k], [1, k], [k, k], [k, 1], [-k, 1], [-k, k], [-1, k], [-1, -k], [-k, -k]]
        )
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T


def _shape_mask(name: str, box: tuple[float, ...], rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """An "L" mask of the shape filling `box` exactly, and the mask's top-left pixel."""
    x0, y0, x1, y1 = box
    ox, oy = int(math.floor(x0)), int(math.floor(y0))
    mw, mh = int(math.ceil(x1)) - ox + 1, int(math.ceil(y1)) - oy + 1
    mask = Image.new("L", (mw, mh), 0)
    draw = ImageDraw.Draw(mask)
    local = (x0 - ox, y0 - oy, x1 - ox, y1 - oy)
    if name == "circle":
        draw.ellipse(local, fill=255)
    elif name == "ring":
        thickness = max(1, round(rng.uniform(0.12, 0.25) * min(x1 - x0, y1 - y0)))
        draw.ellipse(local, outline=255, width=thickness)
    else:
        pts = _unit_polygon(name, rng)
        lo, hi = pts.min(0), pts.max(0)
        pts = (pts - lo) / (hi - lo)  # normalised to the unit square: extremes touch the box
        pts = pts * [local[2] - local[0], local[3] - local[1]] + [local[0], local[1]]
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    return mask, (ox, oy)


def _texture(rng: np.random.Generator, size: tuple[int, int], colour: np.ndarray) -> Image.Image:
    """An RGB fill of `size` (w, h): solid, striped or noisy."""
    w, h = size
    kind = rng.integers(3)
    if kind == 0:
        return Image.new("RGB", size, tuple(int(c) for c in colour))
    if kind == 1:
        other = np.clip(colour + rng.choice([-1, 1]) * rng.integers(60, 140), 0, 255)
        period = rng.uniform(2, max(3.0, min(w, h) / 3))
        angle = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        band = ((xs * math.cos(angle) + ys * math.sin(angle)) // period) % 2  # (H, W) in {0, 1}
        pixels = np.where(band[..., None] > 0, colour, other).astype(np.uint8)
        return Image.fromarray(pixels)
    noise = rng.integers(-50, 51, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(colour.astype(np.int16) + noise, 0, 255).astype(np.uint8))



def render_image(layout: ImageLayout, rng: np.random.Generator) -> Image.Image:
    """The RGB image of `layout`: background, clutter, then the objects in order."""
    pixels, mean_colour = _background(rng, layout.width, layout.height)
    canvas = Image.fromarray(pixels)
    _draw_clutter(rng, canvas)
    for obj in layout.objects:
        mask, origin = _shape_mask(CLASS_NAMES[obj.label], obj.box, rng)
        canvas.paste(_texture(rng, mask.size, _random_colour(rng, avoid=mean_colour)), origin, mask)
    return canvas
