"""Object mask -> per-patch labels on the vision tower's grid, under the exact image transform.

A patch is labelled 1 when the mask covers more than ``threshold`` of its area (default 0: any
overlap, as in the paper). Coverage is computed exactly: the padded square is cut into a
``grid x grid`` lattice of (generally fractional) patch cells in original-pixel units, and each
mask pixel contributes the area of its overlap with each cell. Because the resize is a linear map
of the square, this equals coverage measured after resizing, without resampling artefacts.
"""

from __future__ import annotations

import numpy as np

from maven_dist.data.image_transform import Letterbox

# Overlaps below this are floating-point noise at cell borders, not coverage.
_EPS = 1e-9


def _overlap_matrix(length: int, offset: int, grid: int, cell: float) -> np.ndarray:
    """[grid, length]: overlap of pixel [x, x+1) with cell [i*cell - offset, (i+1)*cell - offset)."""
    starts = np.arange(grid)[:, None] * cell - offset
    pixels = np.arange(length)[None, :]
    return np.clip(np.minimum(pixels + 1, starts + cell) - np.maximum(pixels, starts), 0.0, None)


def patch_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each of the ``grid x grid`` patches (raster order) that `mask` [H, W] covers."""
    height, width = mask.shape
    box = Letterbox(width, height)
    cell = box.side / grid
    over_y = _overlap_matrix(height, box.pad_top, grid, cell)
    over_x = _overlap_matrix(width, box.pad_left, grid, cell)
    area = over_y @ mask.astype(np.float64) @ over_x.T
    return (area / (cell * cell)).reshape(-1)


def mask_to_patch_labels(mask: np.ndarray, grid: int, threshold: float = 0.0) -> np.ndarray:
    """uint8 labels [grid*grid] in raster order: 1 where coverage exceeds `threshold`."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return (patch_coverage(mask.astype(bool), grid) > threshold + _EPS).astype(np.uint8)
