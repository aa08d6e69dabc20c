"""The engine interface the trainer drives, and the single-process reference engine.

An engine owns the (possibly sharded) model, the optimizer and the LR schedule. The trainer calls
``forward`` / ``backward`` per micro-batch and ``step`` once per micro-batch; ``step`` applies the
update on the gradient-accumulation boundary and reports it. ``LocalEngine`` is plain PyTorch in
one process: the baseline every parallel engine is tested against.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from maven_dist.config import StageConfig
from maven_dist.data.batch import Batch
from maven_dist.model.maven import MavenModel, ModelOutput
from maven_dist.train.parts import build_param_groups, trainable_named_parameters
from maven_dist.train.schedule import lr_multiplier


class Engine(Protocol):
    module: MavenModel

    def forward(self, batch: Batch) -> ModelOutput: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool:
        """Count one micro-batch; on the accumulation boundary clip, update and return True."""
        ...

    @property
    def grad_norm(self) -> float: ...

    def learning_rates(self) -> dict[str, float]: ...

    def save_state(self, directory: Path) -> None:
        """Write model, optimizer and scheduler state (every rank calls it)."""
        ...

    def load_state(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full, unsharded weights on rank 0 (None elsewhere); every rank must call it."""
        ...


def build_optimizer(
    model: torch.nn.Module, cfg: StageConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable parameters only, with the stage's warmup + cosine schedule."""
    opt = cfg.optimizer
    groups = build_param_groups(model, opt.lr, opt.weight_decay, opt.part_lr)
    # foreach=False: the same per-parameter arithmetic on every engine, so parity holds to the bit.
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)
    scheduler = LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg.schedule))
    return optimizer, scheduler


class LocalEngine:
    """Single-process PyTorch engine (gradient accumulation, clipping, AdamW, schedule)."""

    def __init__(self, model: MavenModel, cfg: StageConfig, total_steps: int, accumulation: int):
        self.module = model
        self.cfg = cfg
        self.accumulation = accumulation
        self.optimizer, self.scheduler = build_optimizer(model, cfg, total_steps)
        self._micro = 0
        self._grad_norm = math.nan

    def forward(self, batch: Batch) -> ModelOutput:
        return self.module(batch, views=self.cfg.views, loss=self.cfg.loss)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.accumulation:
            return False
        params = [p for _, p in trainable_named_parameters(self.module)]
        clip = self.cfg.optimizer.grad_clip or math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def grad_norm(self) -> float:
        return self._grad_norm

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def save_state(self, directory: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in self.module.state_dict().items()}, directory / "model.safetensors"
        )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "micro": self._micro,
            },
            directory / "optimizer.pt",
        )

    def load_state(self, directory: Path) -> None:
        self.module.load_state_dict(load_file(directory / "model.safetensors"))
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
