"""Learning-rate schedule: linear warmup then cosine decay (LLaVA-1.5: warmup ratio 0.03)."""

from __future__ import annotations

import math

from maven_dist.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor applied to each group's peak lr at optimizer step `step` (0-based)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
