"""The single-process engine: plain PyTorch, the reference every parallel engine is tested against."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maven_dist.config import StageConfig
from maven_dist.contract.batch import Batch
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.model.maven import MavenModel, ModelOutput
from maven_dist.model.parts import trainable_named_parameters
from maven_dist.model.rope import apply_fp32_rope
from maven_dist.parallel.engine import LayoutMismatch, MicroBatchEngine
from maven_dist.parallel.mixed_precision import Fp32MasterWeights
from maven_dist.parallel.optim import build_optimizer


class LocalEngine(MicroBatchEngine):
    """Gradient accumulation, clipping, AdamW and the schedule in one process.

    ``stage.dtype`` is honoured: in bf16 the model runs in bf16 and the optimizer updates fp32 master
    copies of the trainable parameters (``maven_dist/parallel/mixed_precision.py``), as DeepSpeed's bf16
    engines do; RoPE's buffers stay fp32. In fp32 nothing changes."""

    def __init__(self, model: MavenModel, cfg: StageConfig, total_steps: int, accumulation: int):
        self.cfg = cfg
        self.accumulation = accumulation
        self.device = next(model.parameters()).device
        self.masters: Fp32MasterWeights | None = None
        if cfg.dtype == "bf16":
            self.masters = Fp32MasterWeights(trainable_named_parameters(model))
            model = apply_fp32_rope(model.to(torch.bfloat16))
        self.module = model
        self.optimizer, self.scheduler = build_optimizer(self.masters or model, cfg, total_steps)
        self._init_h_eos()

    def _forward(self, batch: Batch, h_eos: torch.Tensor | None = None) -> ModelOutput:
        return self.module(batch, views=self.cfg.views, loss=self.cfg.loss, h_eos=h_eos)

    @torch.no_grad()
    def _eos_pass(self, image_codes: torch.Tensor) -> torch.Tensor:
        return self.module.eos_states(image_codes)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()
        if self.masters is not None:
            self.masters.accumulate_grads()

    def _update(self) -> float:
        params = [p for _, p in trainable_named_parameters(self.masters or self.module)]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            self.masters.copy_to_model()
        return float(norm)

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def save(self, directory: Path) -> None:
        state = {k: v.contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, directory / "model.safetensors")
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.masters is not None:  # the fp32 values the bf16 weights were rounded from
            state["fp32_masters"] = self.masters.state_dict()
        torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path, saved: Manifest) -> None:
        if saved.world_size != 1:
            raise LayoutMismatch(
                f"{directory} was written by {saved.world_size} ranks; one process runs the plain PyTorch "
                "engine, whose state does not convert from DeepSpeed's. Resume with the original number of "
                "processes, or start a new stage from its export (stage.init_from)."
            )
        self.module.load_state_dict(load_file(directory / "model.safetensors"))
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.masters is not None:
            if "fp32_masters" not in state:
                raise LayoutMismatch(
                    f"{directory} was written by an fp32 stage; this one runs stage.dtype=bf16. Resume with "
                    "stage.dtype=fp32, or start a new stage from its export (stage.init_from)"
                )
            self.masters.load_state_dict(state["fp32_masters"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def artifacts(self) -> dict[str, dict]:
        return {}
