"""Sequence arithmetic both sides of the data <-> model contract agree on: positions per image."""

from __future__ import annotations

import math
from collections.abc import Sequence


def num_kept_patches(num_patches: int, keep_ratio: float) -> int:
    """m = floor(alpha * N), at least one patch."""
    return max(1, math.floor(keep_ratio * num_patches + 1e-9))


def visual_tokens_per_image(num_codes: int, num_patches: int, keep_ratio: float, views: Sequence[str]) -> int:
    """Sequence positions one image occupies, boundary tokens included."""
    n = 0
    if "discrete" in views:
        n += num_codes + 2
    if "continuous" in views:
        n += num_kept_patches(num_patches, keep_ratio)
    return n
