"""Synthetic data set: coloured shapes on textured backgrounds, with exact masks and LLaVA-format text.

It is the demo data set (the tiny recipe, the tests), and ground truth for the patch selector:
every object's mask is known exactly, and the COCO annotation written for it decodes (with
pycocotools) to precisely that mask, because the image is *painted from* the decoded mask:

* squares and triangles are annotated as polygons; their mask is pycocotools' rasterisation of the
  polygon, so polygon -> mask is the identity the pseudo-label tool will compute;
* circles are annotated as compressed RLE of their mask.

Objects never overlap (rejection sampling on padded boxes), so no mask is hidden by another. Some
images are not square so that letterboxing (``ImageTransform.pad_to_square``) matters. Everything is
drawn from one ``numpy`` generator seeded by ``seed``: the same seed gives byte-identical files.

Layout under ``out_dir``::

    images/00000.png ...        RGB PNGs
    masks/00000.npz             ``masks`` bool [num_objects, H, W], in annotation order
    captions.json               one caption sample per image (LLaVA format)
    conversations.json          single-image QA (some multi-turn) and two-image comparisons
    instances.json              COCO instances: images, categories (shape names), annotations
    captions.txt                every text above, one per line (tokenizer training)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maven_dist.data.templates import LLAMA_2_SYSTEM, VICUNA_SYSTEM

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
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
_ORDINALS = ("first", "second")


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
class SyntheticSet:
    root: Path
    images: list[SyntheticImage] = field(default_factory=list)

    @property
    def image_root(self) -> Path:
        return self.root / "images"

    @property
    def captions_json(self) -> Path:
        return self.root / "captions.json"

    @property
    def conversations_json(self) -> Path:
        return self.root / "conversations.json"

    @property
    def instances_json(self) -> Path:
        return self.root / "instances.json"

    @property
    def captions_txt(self) -> Path:
        return self.root / "captions.txt"

    def masks(self, index: int) -> np.ndarray:
        """bool [num_objects, H, W] of image `index`, in the order of its annotations."""
        with np.load(self.root / "masks" / f"{Path(self.images[index].file_name).stem}.npz") as f:
            return f["masks"]


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


def _place_objects(
    rng: np.random.Generator, height: int, width: int
) -> list[tuple[str, str, float, float, float]]:
    """Up to 4 non-overlapping (shape, colour, x, y, size) with a 2-pixel gap."""
    wanted = int(rng.integers(1, 5))
    placed: list[tuple[str, str, float, float, float]] = []
    side = min(height, width)
    for _ in range(wanted * 20):
        if len(placed) == wanted:
            break
        size = float(rng.integers(max(6, side // 7), max(8, side // 3)))
        x = float(rng.integers(1, max(2, int(width - size - 1))))
        y = float(rng.integers(1, max(2, int(height - size - 1))))
        if any(
            x < px + ps + 2 and px < x + size + 2 and y < py + ps + 2 and py < y + size + 2
            for _, _, px, py, ps in placed
        ):
            continue
        placed.append(
            (
                SHAPES[int(rng.integers(len(SHAPES)))],
                list(COLOURS)[int(rng.integers(len(COLOURS)))],
                x,
                y,
                size,
            )
        )
    return placed


def _plural(n: int, colour: str, shape: str) -> str:
    return f"{_NUMBERS[n]} {colour} {shape}{'' if n == 1 else 's'}"


def _groups(image: SyntheticImage) -> list[tuple[str, str, int]]:
    """(colour, shape, count) in order of first appearance."""
    seen: dict[tuple[str, str], int] = {}
    for o in image.objects:
        seen[(o.colour, o.shape)] = seen.get((o.colour, o.shape), 0) + 1
    return [(c, s, n) for (c, s), n in seen.items()]


def caption(image: SyntheticImage) -> str:
    parts = [_plural(n, c, s) for c, s, n in _groups(image)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {image.background} background."


def _single_qa(rng: np.random.Generator, image: SyntheticImage) -> list[dict[str, str]]:
    colour, shape, _ = _groups(image)[int(rng.integers(len(_groups(image))))]
    n = image.count(shape, colour)
    turns = [
        {"from": "human", "value": f"<image>\nHow many {colour} {shape}s are in the picture?"},
        {"from": "gpt", "value": f"There {'is' if n == 1 else 'are'} {_plural(n, colour, shape)}."},
    ]
    if rng.random() < 0.5:  # multi-turn, to exercise template rendering of several rounds
        turns += [
            {"from": "human", "value": "What is the background like?"},
            {"from": "gpt", "value": f"The background is {image.background}."},
        ]
    return turns


def _pair_qa(rng: np.random.Generator, a: SyntheticImage, b: SyntheticImage) -> list[dict[str, str]]:
    # Ask about a kind of object that at least one of the two images shows.
    present = sorted({(c, s) for img in (a, b) for c, s, _ in _groups(img)})
    colour, shape = present[int(rng.integers(len(present)))]
    na, nb = a.count(shape, colour), b.count(shape, colour)
    if na == nb:
        answer = f"Both images have {_plural(na, colour, shape)}."
    else:
        answer = f"The {_ORDINALS[int(nb > na)]} image has more {colour} {shape}s ({max(na, nb)} against {min(na, nb)})."
    return [
        {"from": "human", "value": f"<image>\n<image>\nWhich image has more {colour} {shape}s?"},
        {"from": "gpt", "value": answer},
    ]


def generate_synthetic(out_dir: Path, num_images: int, seed: int, image_size: int = 112) -> SyntheticSet:
    """Write the synthetic set (see module docstring) under `out_dir` and describe it."""
    out = SyntheticSet(Path(out_dir))
    out.image_root.mkdir(parents=True, exist_ok=True)
    (out.root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    coco_images, coco_annotations = [], []
    for index in range(num_images):
        # Every third image is landscape, every third portrait (3:4), so letterboxing is exercised.
        width, height = image_size, image_size
        if index % 3 == 1:
            height = image_size * 3 // 4
        elif index % 3 == 2:
            width = image_size * 3 // 4
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        pixels = _background(rng, background, height, width)
        objects, masks = [], []
        for shape, colour, x, y, size in _place_objects(rng, height, width):
            segmentation, mask = _segment(shape, x, y, size, height, width)
            pixels[mask] = COLOURS[colour]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
            objects.append(SyntheticObject(shape, colour, bbox))
            masks.append(mask)
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": index + 1,
                    "category_id": SHAPES.index(shape) + 1,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": list(bbox),
                    "iscrowd": 0,
                    "colour": colour,
                }
            )
        file_name = f"{index:05d}.png"
        Image.fromarray(pixels, "RGB").save(out.image_root / file_name, optimize=False)
        np.savez_compressed(out.root / "masks" / f"{index:05d}.npz", masks=np.stack(masks))
        coco_images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        out.images.append(SyntheticImage(file_name, width, height, background, tuple(objects)))

    captions = [
        {
            "id": f"cap-{i:05d}",
            "image": img.file_name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": caption(img)},
            ],
        }
        for i, img in enumerate(out.images)
    ]
    conversations = [
        {"id": f"qa-{i:05d}", "image": img.file_name, "conversations": _single_qa(rng, img)}
        for i, img in enumerate(out.images)
    ]
    for i in range(num_images // 2):
        a, b = out.images[2 * i], out.images[2 * i + 1]
        conversations.append(
            {"id": f"mqa-{i:05d}", "image": [a.file_name, b.file_name], "conversations": _pair_qa(rng, a, b)}
        )
    instances = {
        "info": {"description": f"maven_dist synthetic shapes, seed {seed}"},
        "images": coco_images,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
        "annotations": coco_annotations,
    }
    out.captions_json.write_text(json.dumps(captions, indent=1))
    out.conversations_json.write_text(json.dumps(conversations, indent=1))
    out.instances_json.write_text(json.dumps(instances))
    texts = [
        t["value"].replace("<image>\n", "") for s in captions + conversations for t in s["conversations"]
    ]
    # The templates' fixed text is part of every training sequence, so the tokenizer should learn it too.
    texts += [VICUNA_SYSTEM, LLAMA_2_SYSTEM, "USER: ASSISTANT:", "[INST] <<SYS>> <</SYS>> [/INST]"]
    out.captions_txt.write_text("\n".join(texts) + "\n")
    return out
