"""One synthetic scene: coloured shapes on a textured background, with exact masks and COCO segmentations.

Every object's mask is known exactly, and the COCO annotation written for it decodes (with pycocotools)
to precisely that mask, because the image is *painted from* the decoded mask:

* squares and triangles are annotated as polygons; their mask is pycocotools' rasterisation of the
  polygon, so polygon -> mask is the identity the pseudo-label tool will compute;
* circles are annotated as compressed RLE of their mask.

Objects never overlap (rejection sampling on padded boxes), so no mask is hidden by another. Half of the
objects after the first repeat a (colour, shape) the scene already has, so counts above one are common
(the counting questions need them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = ("striped", "checkered", "noisy", "gradient")
MAX_OBJECTS = 5
_REPEAT_KIND = 0.5
"""Chance that an object after the first repeats a (colour, shape) already in the scene."""


@dataclass(frozen=True)
class SyntheticObject:
    shape: str
    colour: str
    bbox: tuple[float, float, float, float]
    """COCO [x, y, w, h] of the mask."""


@dataclass(frozen=True)
class SyntheticImage:
    file_name: str
    """Path relative to ``SyntheticSet.image_root``, as written in the JSON files."""
    width: int
    height: int
    background: str
    objects: tuple[SyntheticObject, ...]

    def count(self, shape: str, colour: str | None = None) -> int:
        return sum(o.shape == shape and (colour is None or o.colour == colour) for o in self.objects)


@dataclass
class Scene:
    """A drawn scene: its pixels, objects, masks (annotation order) and COCO segmentations."""

    pixels: np.ndarray
    """uint8 [H, W, 3]."""
    background: str
    objects: list[SyntheticObject]
    masks: list[np.ndarray]
    segmentations: list[dict | list]


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A muted texture, so shapes stand out but the tower still sees structure."""
    base = rng.integers(90, 200, size=3)
    other = np.clip(base + rng.integers(-50, 51, size=3), 0, 255)
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "striped":
        period = int(rng.integers(6, 16))
        sel = ((xx + yy) // period) % 2 == 0
    elif kind == "checkered":
        period = int(rng.integers(6, 16))
        sel = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == "noisy":
        noise = rng.integers(-25, 26, size=(height, width, 3))
        return np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)
    else:  # gradient
        t = (xx / max(width - 1, 1))[..., None]
        return np.clip(base[None, None] * (1 - t) + other[None, None] * t, 0, 255).astype(np.uint8)
    out = np.where(sel[..., None], base[None, None], other[None, None])
    return out.astype(np.uint8)


def _polygon(shape: str, x: float, y: float, size: float) -> list[float]:
    if shape == "square":
        pts = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    else:  # upward triangle
        pts = [(x + size / 2, y), (x + size, y + size), (x, y + size)]
    return [float(c) for p in pts for c in p]


def _segment(
    shape: str, x: float, y: float, size: float, height: int, width: int
) -> tuple[dict | list, np.ndarray]:
    """(COCO segmentation, bool mask) that decode to each other exactly."""
    if shape == "circle":
        yy, xx = np.mgrid[0:height, 0:width]
        r = size / 2
        mask = (xx + 0.5 - (x + r)) ** 2 + (yy + 0.5 - (y + r)) ** 2 <= r * r
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}, mask
    poly = [_polygon(shape, x, y, size)]
    rle = mask_utils.merge(mask_utils.frPyObjects(poly, height, width))
    return poly, mask_utils.decode(rle).astype(bool)


def _kind(rng: np.random.Generator, placed: list[tuple[str, str, float, float, float]]) -> tuple[str, str]:
    if placed and rng.random() < _REPEAT_KIND:
        shape, colour, *_ = placed[int(rng.integers(len(placed)))]
        return shape, colour
    return SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]


def _place_objects(
    rng: np.random.Generator, height: int, width: int, max_objects: int
) -> list[tuple[str, str, float, float, float]]:
    """1 to `max_objects` non-overlapping (shape, colour, x, y, size) with a 2-pixel gap."""
    wanted = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[str, str, float, float, float]] = []
    side = min(height, width)
    for _ in range(wanted * 20):
        if len(placed) == wanted:
            break
        size = float(rng.integers(max(6, side // 5), max(8, side // 3)))
        x = float(rng.integers(1, max(2, int(width - size - 1))))
        y = float(rng.integers(1, max(2, int(height - size - 1))))
        if any(
            x < px + ps + 2 and px < x + size + 2 and y < py + ps + 2 and py < y + size + 2
            for _, _, px, py, ps in placed
        ):
            continue
        placed.append((*_kind(rng, placed), x, y, size))
    return placed


def imagined_scene(
    rng: np.random.Generator, name: str, side: int, max_objects: int = MAX_OBJECTS
) -> SyntheticImage:
    """A scene as :func:`draw_scene` composes one (background, 1 to `max_objects` objects), described but not
    drawn: text about the world costs a fraction of an image (the LLM's pretraining corpus)."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    placed = _place_objects(rng, side, side, max_objects)
    objects = tuple(
        SyntheticObject(shape, colour, (x, y, size, size)) for shape, colour, x, y, size in placed
    )
    return SyntheticImage(name, side, side, background, objects)


def draw_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw one scene of ``width x height`` pixels, with 1 to `max_objects` objects, from `rng`."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = _background(rng, background, height, width)
    scene = Scene(pixels, background, [], [], [])
    for shape, colour, x, y, size in _place_objects(rng, height, width, max_objects):
        segmentation, mask = _segment(shape, x, y, size, height, width)
        pixels[mask] = COLOURS[colour]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
        scene.objects.append(SyntheticObject(shape, colour, bbox))
        scene.masks.append(mask)
        scene.segmentations.append(segmentation)
    return scene
