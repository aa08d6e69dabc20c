"""Patch pseudo-labels for stage 1, written into the shards' ``patch_labels`` column.

``make_patch_labels(shards_dir, source="coco", annotations=[...], grid=24)`` is what
``maven labels`` and the pipeline call. A source (COCO masks, Visual Genome boxes
or Grounding SAM) gives one mask per image in original pixels; :func:`mask_to_patch_labels` maps it
through the tower's letterbox to ``grid x grid`` labels (raster order, uint8).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from maven_dist.offline.pseudo_labels.coco import CocoMasks
from maven_dist.offline.pseudo_labels.grounding_sam import GroundingSam, GroundingSamConfig
from maven_dist.offline.pseudo_labels.patch_labels import mask_to_patch_labels
from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest, MaskSource
from maven_dist.offline.pseudo_labels.visual_genome import VisualGenomeBoxes
from maven_dist.offline.shard_jobs import ImageItem, ItemFailure, JobReport, run_column_job

SourceName = Literal["coco", "vg", "grounding_sam"]


def grid_from_tower(tower_dir: str | Path) -> int:
    """Patch grid side of a saved CLIP vision tower: image_size // patch_size (336/14 -> 24)."""
    path = Path(tower_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: pass the vision tower directory saved with save_pretrained"
        )
    cfg = json.loads(path.read_text())
    cfg = cfg.get("vision_config", cfg)  # a full CLIPModel config nests the tower's
    return int(cfg["image_size"]) // int(cfg["patch_size"])


def build_mask_source(
    source: SourceName,
    *,
    annotations: list[str | Path] | None = None,
    vg_select: Literal["text", "all"] = "text",
    grounding: GroundingSamConfig | None = None,
) -> MaskSource:
    """The mask source named `source`; COCO/VG need `annotations`, Grounding SAM its model dirs."""
    if source in ("coco", "vg") and not annotations:
        raise ValueError(
            f"source={source!r} needs annotation files (COCO instances_*.json / VG region_descriptions.json)"
        )
    if source == "coco":
        return CocoMasks(annotations)
    if source == "vg":
        return VisualGenomeBoxes(annotations, select=vg_select)
    if source == "grounding_sam":
        if grounding is None:
            raise ValueError("source='grounding_sam' needs a GroundingSamConfig with dino_path and sam_path")
        return GroundingSam(grounding)
    raise ValueError(f"unknown pseudo-label source {source!r}; choose coco, vg or grounding_sam")


def label_images(
    source: MaskSource, items: list[ImageItem], grid: int, threshold: float = 0.0
) -> list[list[int] | ItemFailure]:
    """Patch labels (grid*grid ints in {0, 1}) or a failure per image."""
    requests = [MaskRequest(it.image_path, it.width, it.height, it.text, it.image_bytes) for it in items]
    out: list[list[int] | ItemFailure] = []
    for _req, result in zip(requests, source.masks(requests), strict=True):
        if isinstance(result, MaskFailure):
            out.append(ItemFailure(f"{source.name}: {result.reason}"))
        else:
            out.append(mask_to_patch_labels(result, grid, threshold).tolist())
    return out


def make_patch_labels(
    shards_dir: str | Path,
    source: SourceName | MaskSource = "coco",
    *,
    grid: int = 24,
    threshold: float = 0.0,
    annotations: list[str | Path] | None = None,
    vg_select: Literal["text", "all"] = "text",
    grounding: GroundingSamConfig | None = None,
    shard_files: Sequence[str | Path] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Write ``patch_labels`` into every shard of `shards_dir` (skipping done shards unless `overwrite`).

    `shard_files` limits it to this process's part of the shards (``shard_jobs.plan_shard_files``).
    """

    def build_compute():
        mask_source = source
        if isinstance(mask_source, str):
            mask_source = build_mask_source(
                mask_source, annotations=annotations, vg_select=vg_select, grounding=grounding
            )
        return lambda items: label_images(mask_source, items, grid, threshold)

    return run_column_job(
        shards_dir,
        "patch_labels",
        build_compute,
        shard_files=shard_files,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
    )
