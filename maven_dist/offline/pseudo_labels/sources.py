"""What every mask source returns, so the shard writer treats COCO, VG and Grounding SAM alike.

A source turns a batch of :class:`MaskRequest` (one image, its size and the text that talks about
it) into one binary mask per request in original-pixel coordinates, or a :class:`MaskFailure`
with the reason, so one bad image is recorded and skipped instead of stopping the batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePath
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class MaskRequest:
    image_path: str
    """The image's path as the source JSON wrote it (COCO/VG match on its file name)."""
    width: int
    """Width of the *original* image in pixels (annotations are in these coordinates)."""
    height: int
    """Height of the original image in pixels."""
    text: str = ""
    """Caption or referring expression of the sample; text-guided sources segment what it names."""
    image_bytes: bytes | None = None
    """Encoded image (possibly resized from the original, same aspect) for sources that look at pixels."""

    @property
    def key(self) -> str:
        """The file name: what COCO's ``file_name`` and VG's ``<image_id>.jpg`` match on."""
        return PurePath(self.image_path).name

    def load_image(self) -> Image.Image:
        if self.image_bytes is None:
            raise ValueError(f"{self.image_path}: no image bytes in the request")
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


@dataclass(frozen=True)
class MaskFailure:
    reason: str
    """Why no mask could be produced (recorded in the rejects file)."""


MaskResult = np.ndarray | MaskFailure


class MaskSource(Protocol):
    """Anything that segments a batch of images: COCO, Visual Genome, Grounding SAM."""

    name: str

    def masks(self, requests: list[MaskRequest]) -> list[MaskResult]:
        """One bool [height, width] mask (or a failure) per request, in order."""
        ...


def box_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Union of xyxy boxes (pixel units, pixel x covers [x, x+1)) as a bool [height, width] mask.

    A pixel is inside when its centre is inside the box; boxes are clipped to the image.
    """
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, c1 = int(np.clip(np.round(x0), 0, width)), int(np.clip(np.round(x1), 0, width))
        r0, r1 = int(np.clip(np.round(y0), 0, height)), int(np.clip(np.round(y1), 0, height))
        mask[r0:r1, c0:c1] = True
    return mask
