"""Visual Genome region boxes as a mask source.

VG has no masks, only region boxes with a phrase each, and ~50 regions per image: their union
covers nearly every image, which would teach the selector nothing. So by default an image's mask
is the union of the regions whose phrase occurs in the sample's text (the regions the text talks
about, as Grounding SAM would find them); ``select="all"`` takes every region instead.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest, MaskResult, box_mask


def _normalise(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


class VisualGenomeBoxes:
    """Union of VG region boxes per image, looked up by ``<image_id>.jpg``."""

    name = "vg"

    def __init__(self, region_files: list[str | Path], select: Literal["text", "all"] = "text"):
        self.select = select
        self._regions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for path in map(Path, region_files):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Visual Genome region file {path} does not exist (region_descriptions.json)"
                )
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise ValueError(
                    f"{path} is not VG region_descriptions.json: expected a list of {{id, regions}}"
                )
            for i, entry in enumerate(data):
                if "regions" not in entry or "id" not in entry:
                    raise ValueError(f"{path}: entry {i} has no 'id'/'regions'")
                self._regions[f"{entry['id']}.jpg"].extend(entry["regions"])

    def mask(self, request: MaskRequest) -> MaskResult:
        if request.key not in self._regions:
            return MaskFailure(f"{request.key} is not in the Visual Genome region files")
        regions = self._regions[request.key]
        if self.select == "text":
            text = _normalise(request.text)
            regions = [
                r
                for r in regions
                if _normalise(r.get("phrase", "")).strip() and _normalise(r["phrase"]) in text
            ]
            if not regions:
                return MaskFailure(f"no VG region phrase of {request.key} occurs in the sample text")
        boxes = np.array(
            [[r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]] for r in regions], dtype=np.float64
        )
        return box_mask(boxes, request.width, request.height)

    def masks(self, requests: list[MaskRequest]) -> list[MaskResult]:
        return [self.mask(r) for r in requests]
