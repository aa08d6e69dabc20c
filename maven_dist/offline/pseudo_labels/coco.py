"""COCO instance annotations as a mask source: polygons and RLE rasterised by pycocotools.

pycocotools follows the pixel-area convention the patch labeller uses (pixel x covers [x, x+1),
so a polygon with integer corners (x0, y0)-(x1, y1) fills exactly rows y0..y1-1, columns
x0..x1-1), which is why COCO masks go through it rather than a hand-written rasteriser.
The mask of an image is the union of all its instances, crowd regions included: stage 1 teaches
the selector where objects are, and every COCO instance is one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest, MaskResult


def annotation_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
    """One COCO ``segmentation`` (polygon list, compressed or uncompressed RLE) -> bool [H, W]."""
    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE (crowds)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown COCO segmentation of type {type(segmentation).__name__}")
    size = tuple(rle["size"])
    if size != (height, width):
        raise ValueError(
            f"RLE size {list(size)} does not match the image's [height, width] [{height}, {width}]"
        )
    return mask_utils.decode(rle).astype(bool)


class CocoMasks:
    """Union of the COCO instance masks of each image, looked up by file name."""

    name = "coco"

    def __init__(self, annotation_files: list[str | Path]):
        self._images: dict[str, dict[str, Any]] = {}
        self._anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self._next_uid = 0  # COCO ids are unique only within one file; images get our own id
        for path in annotation_files:
            self._add(Path(path))

    def _add(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"COCO annotation file {path} does not exist (e.g. annotations/instances_train2017.json)"
            )
        data = json.loads(path.read_text())
        if "images" not in data or "annotations" not in data:
            raise ValueError(f"{path} is not a COCO instances file: it needs 'images' and 'annotations'")
        ids = {}
        for image in data["images"]:
            ids[image["id"]] = self._next_uid
            self._images[Path(image["file_name"]).name] = {
                **image,
                "_uid": self._next_uid,
                "_file": str(path),
            }
            self._next_uid += 1
        for ann in data["annotations"]:
            if ann["image_id"] not in ids:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')} names image_id {ann['image_id']} that has no 'images' entry"
                )
            self._anns[ids[ann["image_id"]]].append(ann)

    def __contains__(self, key: str) -> bool:
        return key in self._images

    def mask(self, request: MaskRequest) -> MaskResult:
        image = self._images.get(request.key)
        if image is None:
            return MaskFailure(f"{request.key} is not in the COCO annotation files")
        if (image["width"], image["height"]) != (request.width, request.height):
            return MaskFailure(
                f"COCO says {request.key} is {image['width']}x{image['height']} ({image['_file']}), "
                f"the file is {request.width}x{request.height}"
            )
        mask = np.zeros((request.height, request.width), dtype=bool)
        for ann in self._anns[image["_uid"]]:
            try:
                mask |= annotation_mask(ann["segmentation"], request.width, request.height)
            except (ValueError, KeyError, TypeError) as exc:
                return MaskFailure(
                    f"COCO annotation {ann.get('id')} of {request.key} ({image['_file']}): {exc}"
                )
        return mask

    def masks(self, requests: list[MaskRequest]) -> list[MaskResult]:
        return [self.mask(r) for r in requests]
