"""Image -> tower input, with the geometry exposed so patch labels can follow it exactly.

LLaVA-1.5 pads every image to a square with the processor's mean colour ("pad" aspect mode,
``expand2square``; the mean times 255, truncated) and then lets ``CLIPImageProcessor`` resize to 336 and
centre-crop, which is a no-op on a square. We do the same in one place: centred pad to ``side = max(w, h)``, bicubic resize
to ``image_size``, normalise. :class:`Letterbox` records where the original pixels land so that
``maven_dist/offline/pseudo_labels/patch_labels.py`` maps masks through the identical transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Letterbox:
    """Where an original ``width x height`` image sits inside its padded square."""

    width: int
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def pad_left(self) -> int:
        return (self.side - self.width) // 2

    @property
    def pad_top(self) -> int:
        return (self.side - self.height) // 2


@dataclass(frozen=True)
class ImageTransform:
    image_size: int
    """Side of the square the tower sees."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_pretrained(cls, tower_dir: str | Path) -> ImageTransform:
        """Read size, mean and std from a tower's ``preprocessor_config.json`` (CLIPImageProcessor)."""
        path = Path(tower_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: save the tower with its CLIPImageProcessor")
        cfg = json.loads(path.read_text())
        crop = cfg.get("crop_size") or cfg.get("size")
        size = (
            crop["height"]
            if isinstance(crop, dict) and "height" in crop
            else (crop.get("shortest_edge") if isinstance(crop, dict) else crop)
        )
        return cls(int(size), tuple(cfg["image_mean"]), tuple(cfg["image_std"]))

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's ``expand2square`` fill, ``tuple(int(x * 255) for x in image_processor.image_mean)``: the mean
        truncated, (122, 116, 104) for CLIP's, not rounded (123, 117, 104)."""
        return tuple(int(m * 255) for m in self.mean)

    def letterbox(self, image: Image.Image) -> Letterbox:
        return Letterbox(*image.size)

    def pad_to_square(self, image: Image.Image) -> Image.Image:
        box = self.letterbox(image)
        if box.width == box.height:
            return image
        fill = self.pad_color
        canvas = Image.new("RGB", (box.side, box.side), fill)
        canvas.paste(image, (box.pad_left, box.pad_top))
        return canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float tensor [3, image_size, image_size]."""
        square = self.pad_to_square(image.convert("RGB"))
        if square.size != (self.image_size, self.image_size):
            square = square.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std
