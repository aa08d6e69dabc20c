"""The optimizer every engine uses: AdamW over the trainable parts' parameter groups, with the stage's
linear warmup then cosine decay (LLaVA-1.5: warmup ratio 0.03)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from maven_dist.config import ScheduleConfig, StageConfig
from maven_dist.model.parts import part_of, trainable_named_parameters


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


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases are 1-D: decaying them only hurts (LLaVA, nanoGPT, torchtitan)."""
    return len(getattr(param, "ds_shape", param.shape)) < 2 or name.endswith(".bias")


class NamedParameters(Protocol):
    """What the optimizer is built over: a model, or its fp32 masters (``mixed_precision.py``) under its names."""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


def build_param_groups(
    model: NamedParameters, lr: float, weight_decay: float, part_lr: dict[str, float]
) -> list[dict]:
    """AdamW groups per (part, decay): per-part learning rates where the stage sets them, no decay
    on norms and biases. Frozen parameters are left out, so they get no optimizer state."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in trainable_named_parameters(model):
        part = part_of(name)
        decay = not _no_decay(name, param)
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "lr": part_lr.get(part, lr),
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{part}/{'decay' if decay else 'no_decay'}",
            },
        )
        group["params"].append(param)
    if not groups:
        raise ValueError("the stage trains no parameters; check stage.trainable")
    return list(groups.values())


def build_optimizer(
    model: NamedParameters, cfg: StageConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable parameters only, with the stage's warmup + cosine schedule."""
    opt = cfg.optimizer
    groups = build_param_groups(model, opt.lr, opt.weight_decay, opt.part_lr)
    # foreach=False: the same per-parameter arithmetic on every engine, so parity holds to the bit.
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)
    scheduler = LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg.schedule))
    return optimizer, scheduler
