"""Sequence arithmetic both sides of the data <-> model contract agree on: positions per image."""

from __future__ import annotations

import math
from collections.abc import Sequence


def num_kept_patches(num_patches: int, keep_ratio: float) -> int:
    """m = floor(alpha * N), at least one patch."""
    return max(1, math.floor(keep_ratio * num_patches + 1e-9))


def image_tokens(num_codes: int, num_patches: int, keep_ratio: float, views: Sequence[str]) -> int:
    """The paper's visual tokens per image: the codes and the kept patches, without ``<img>`` ``</img>``
    (89 / 176 / 608 at alpha = 0.1 / 0.25 / 1 with 32 codes and 576 patches)."""
    codes = num_codes if "discrete" in views else 0
    return codes + (num_kept_patches(num_patches, keep_ratio) if "continuous" in views else 0)


def visual_tokens_per_image(num_codes: int, num_patches: int, keep_ratio: float, views: Sequence[str]) -> int:
    """Sequence positions one image occupies: :func:`image_tokens` plus the two boundary tokens of the
    discrete block."""
    boundaries = 2 if "discrete" in views else 0
    return image_tokens(num_codes, num_patches, keep_ratio, views) + boundaries
