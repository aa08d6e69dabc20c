"""Grounding SAM as a mask source: text noun phrases -> Grounding DINO boxes -> SAM masks -> union.

This is how the paper makes stage-1 labels (MaVEn §3.3): segment what the text talks about. Both
halves are transformers models loaded from local directories (``save_pretrained`` layout, e.g.
``IDEA-Research/grounding-dino-base`` and ``facebook/sam-vit-huge`` copied to disk); nothing is
downloaded. A batch of images runs through Grounding DINO in one forward pass with per-image
prompts, then through SAM in one forward pass with each image's boxes as prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maven_dist.offline.pseudo_labels.noun_phrases import extract_noun_phrases, grounding_prompt
from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest, MaskResult


@dataclass(frozen=True)
class GroundingSamConfig:
    dino_path: str
    """Local directory with GroundingDinoForObjectDetection weights and its processor files."""
    sam_path: str
    """Local directory with SamModel weights and its processor files."""
    box_threshold: float = 0.35
    """Keep boxes whose best phrase score exceeds this (Grounding SAM's default)."""
    text_threshold: float = 0.25
    """Token score above which a phrase token counts as matched (Grounding SAM's default)."""
    max_boxes: int = 16
    """Most boxes per image handed to SAM (highest scores first)."""
    device: str = ""
    """Torch device; empty means cuda when present, else cpu."""


def _resolve_device(device: str) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class GroundingSam:
    """Batched Grounding DINO + SAM; one bool mask per image (union of the masks of all kept boxes)."""

    name = "grounding_sam"

    def __init__(self, cfg: GroundingSamConfig):
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        for what, path in (("Grounding DINO", cfg.dino_path), ("SAM", cfg.sam_path)):
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(
                    f"{what} directory {path} has no config.json: save the model and its processor there "
                    "with save_pretrained (see docs/data_preparation.md)"
                )
        # Imported here: transformers takes seconds to import, and COCO/VG labels and
        # `maven labels --dry-run` (the check slurm/labels_array.sh runs before queueing) never need it.
        from transformers import (
            GroundingDinoForObjectDetection,
            GroundingDinoProcessor,
            SamModel,
            SamProcessor,
        )

        self.dino = GroundingDinoForObjectDetection.from_pretrained(cfg.dino_path, local_files_only=True)
        self.dino_processor = GroundingDinoProcessor.from_pretrained(cfg.dino_path, local_files_only=True)
        self.sam = SamModel.from_pretrained(cfg.sam_path, local_files_only=True)
        self.sam_processor = SamProcessor.from_pretrained(cfg.sam_path, local_files_only=True)
        self.dino.to(self.device).eval()
        self.sam.to(self.device).eval()

    @torch.no_grad()
    def detect(self, images: list, prompts: list[str]) -> list[np.ndarray]:
        """Grounding DINO: xyxy boxes [k, 4] in original pixels per image, best score first."""
        inputs = self.dino_processor(images=images, text=prompts, return_tensors="pt", padding=True).to(
            self.device
        )
        outputs = self.dino(**inputs)
        results = self.dino_processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.cfg.box_threshold,
            text_threshold=self.cfg.text_threshold,
            target_sizes=[(im.height, im.width) for im in images],
        )
        boxes = []
        for res in results:
            order = torch.argsort(res["scores"], descending=True)[: self.cfg.max_boxes]
            boxes.append(res["boxes"][order].float().cpu().numpy())
        return boxes

    @torch.no_grad()
    def segment(self, images: list, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """SAM: the union of the box-prompted masks per image (every image must have >= 1 box)."""
        # SAM takes the same number of boxes per image in a batch: pad with repeats of the first
        # box, which leave the union unchanged.
        most = max(len(b) for b in boxes)
        padded = [np.concatenate([b, np.repeat(b[:1], most - len(b), axis=0)]).tolist() for b in boxes]
        inputs = self.sam_processor(images=images, input_boxes=padded, return_tensors="pt").to(self.device)
        outputs = self.sam(**inputs, multimask_output=False)
        masks = self.sam_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )
        return [m.reshape(-1, *m.shape[-2:]).any(dim=0).numpy() for m in masks]

    def _detect_by_size(self, images: list, prompts: list[str]) -> list[np.ndarray]:
        """Detect in batches of equally sized images only.

        Grounding DINO pads a batch to its largest image, and the Swin backbone sees the padding,
        so an image's boxes would depend on what it was batched with. Grouping by size keeps every
        image's result identical to running it alone (tested); SAM needs no grouping, it pads
        every image to the same square anyway.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            groups.setdefault(image.size, []).append(k)
        boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * len(images)
        for members in groups.values():
            found = self.detect([images[k] for k in members], [prompts[k] for k in members])
            for k, b in zip(members, found, strict=True):
                boxes[k] = b
        return boxes

    def masks(self, requests: list[MaskRequest]) -> list[MaskResult]:
        results: list[MaskResult | None] = [None] * len(requests)
        images, prompts, where = [], [], []
        for i, req in enumerate(requests):
            phrases = extract_noun_phrases(req.text)
            if not phrases:
                results[i] = MaskFailure("the text has no noun phrase to ground")
                continue
            images.append(req.load_image())
            prompts.append(grounding_prompt(phrases))
            where.append(i)
        if images:
            boxes = self._detect_by_size(images, prompts)
            found = [k for k, b in enumerate(boxes) if len(b)]
            for k, b in enumerate(boxes):
                if not len(b):
                    results[where[k]] = MaskFailure(
                        f"Grounding DINO found no box above box_threshold={self.cfg.box_threshold} for {prompts[k]!r}"
                    )
            if found:
                masks = self.segment([images[k] for k in found], [boxes[k] for k in found])
                for k, mask in zip(found, masks, strict=True):
                    results[where[k]] = mask
        return results  # type: ignore[return-value]
