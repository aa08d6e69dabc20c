"""ZeRO-3 backend: the HF-based MavenModel under DeepSpeed stage 3.

The model's modules are constructed inside ``deepspeed.zero.Init`` so no rank ever holds the full 7B/13B
weights; after it, pretrained tensors are streamed from disk and copied into each partitioned parameter
under ``GatheredParameters`` (rank 0 writes, DeepSpeed re-partitions), and the new vocabulary rows drawn. Frozen parts are left out
of the optimizer's parameter groups, so ZeRO keeps no fp32 master copy or Adam moments for them.

A checkpoint written by another number of ranks is loaded through DeepSpeed's universal checkpoint
format: :meth:`Zero3Engine.load` converts it once, switches the engine's loader to it, and repairs the
Adam step counts and group hyperparameters DeepSpeed 0.19's ZeRO-3 universal load gets wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from maven_dist.config import Config
from maven_dist.contract.atomic_write import atomic_directory
from maven_dist.contract.batch import Batch
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.model.maven import MavenModel, ModelOutput, copy_param
from maven_dist.model.parts import apply_trainable
from maven_dist.parallel.deepspeed_common import (
    DEEPSPEED_SAFE_GLOBALS,
    DeepSpeedEngineState,
    base_ds_config,
    init_deepspeed_distributed,
)
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.engine import LayoutMismatch, MicroBatchEngine
from maven_dist.parallel.optim import build_optimizer
from maven_dist.parallel.zero3_settings import zero_optimization

CHECKPOINT_TAG = "zero"
UNIVERSAL_TAG = "universal"


def build_ds_config(cfg: Config, dims: ParallelDims, accumulation: int) -> dict:
    """DeepSpeed config generated from the recipe (one source of truth for batch sizes and precision); the
    ZeRO-3 knobs come from zero3_settings.py, which the memory planner reads too."""
    return base_ds_config(cfg, dims, accumulation) | {
        "zero_optimization": zero_optimization(gpu=torch.cuda.is_available()),
    }


def zero3_copy(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Copy a full tensor into a ZeRO-3 partitioned parameter (rank 0 writes, then re-partition)."""
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if not dist.is_initialized() or dist.get_rank() == 0:
            copy_param(param, value)


class Zero3Engine(DeepSpeedEngineState, MicroBatchEngine):
    checkpoint_tag = CHECKPOINT_TAG

    def __init__(
        self,
        build_model: Callable[..., MavenModel],
        cfg: Config,
        dims: ParallelDims,
        total_steps: int,
        accumulation: int,
    ):
        self.cfg = cfg.stage
        self.accumulation = accumulation
        self.ds_config = build_ds_config(cfg, dims, accumulation)
        init_deepspeed_distributed()
        # Only the modules are built inside zero.Init; weights are streamed in after it (see
        # MavenModel.from_base for what goes wrong inside).
        model = build_model(
            copy_fn=zero3_copy, construct=lambda: deepspeed.zero.Init(config_dict_or_path=self.ds_config)
        )
        apply_trainable(model, cfg.stage.trainable)
        if cfg.stage.gradient_checkpointing:
            model.enable_activation_checkpointing()
        self.torch_optimizer, scheduler = build_optimizer(model, cfg.stage, total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.torch_optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self._use_weights_only_checkpoints()
        self.module: MavenModel = self.engine.module
        self.device = self.engine.device
        self._init_h_eos()

    # ------------------------------------------------------------------ the step

    def _forward(self, batch: Batch, h_eos: torch.Tensor | None = None) -> ModelOutput:
        return self.engine(batch, views=self.cfg.views, loss=self.cfg.loss, h_eos=h_eos)

    @torch.no_grad()
    def _eos_pass(self, image_codes: torch.Tensor) -> torch.Tensor:
        # Through DeepSpeed's forward, as any forward: ZeRO-3 gathers the LLM for it (the one all-gather the
        # pass costs; see maven_dist/parallel/h_eos.py for how few there are now).
        return self.engine(eos_codes=image_codes)

    def _backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1 / accumulation, and counts micro-steps in step(): it updates on the last.
        self.engine.backward(loss)
        self.engine.step()

    def _update(self) -> float:
        return self._global_grad_norm()

    # ------------------------------------------------------------------ state

    def load(self, directory: Path, saved: Manifest) -> None:
        world = dist.get_world_size()
        if saved.world_size == 1 and not (directory / CHECKPOINT_TAG).is_dir():
            raise LayoutMismatch(
                f"{directory} was written by one process (the plain PyTorch engine), this run has {world} "
                "ZeRO-3 ranks; the states do not convert. Resume with one process, or start a new stage from "
                "its export (stage.init_from)."
            )
        if saved.world_size == world:
            self._load_tag(directory, CHECKPOINT_TAG)
            return
        maybe_convert_to_universal(directory)
        # DeepSpeed decides how to read a checkpoint from this config flag; it has no per-call switch.
        self.engine._config.load_universal_checkpoint = True
        names = [group["name"] for group in self.torch_optimizer.param_groups]
        self._load_tag(directory, UNIVERSAL_TAG)
        self._repair_universal_optimizer_state(directory / UNIVERSAL_TAG, names)

    def _repair_universal_optimizer_state(self, universal_dir: Path, names: list[str]) -> None:
        """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load
        (``stage3.py:load_hp_checkpoint_state_from_checkpoint_dir_stage3``), which otherwise restores
        master weights and both Adam moments bit for bit:

        * it puts ONE ``step`` tensor object into the Adam state of every sub-group, and torch's AdamW
          increments it in place once per sub-group per update. With the projector's two groups (decay,
          no_decay) the count went 5 -> 15 over five steps, Adam's bias correction used steps 6, 8, ...
          and 7, 9, ..., and tiny stage 3 resumed from 2 on 4 ranks drifted up to 6.1e-5 relative in
          loss by step 9 (an uninterrupted 4-rank run stays within 1.8e-8 of the 2-rank one).
        * it copies the first saved group's hyperparameters (``name``, ``lr``, ``weight_decay``, ...) into
          every group: wrong with ``stage.optimizer.part_lr`` or ``weight_decay`` > 0, and the lr metrics
          lose the other groups' names.

        Both fixes are no-ops where DeepSpeed gets them right."""
        zero = self.engine.optimizer
        for flat in zero.fp32_partitioned_groups_flat:
            state = zero.optimizer.state[flat]
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            saved = torch.load(
                universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True
            )
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        saved_names = [group.get("name") for group in saved_groups]
        if saved_names != names:
            raise LayoutMismatch(
                f"{universal_dir} holds optimizer groups {saved_names}, this run builds {names}; resume with the "
                "recipe's stage.trainable and stage.optimizer, or start a new stage from its export."
            )
        for group, saved_group in zip(zero.optimizer.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if dist.get_rank() != 0:
            return None
        # Where the world size does not divide a parameter, the gathered tensor is a view of a padded
        # buffer; safetensors (rightly) refuses to save a tensor that does not cover its storage.
        return {k: v if _owns_storage(v) else v.clone() for k, v in state.items()}


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def maybe_convert_to_universal(engine_dir: Path) -> None:
    """Rank 0 converts `engine_dir/zero` (written by N ranks) to DeepSpeed's rank-count-independent
    universal format in `engine_dir/universal`, once; every rank waits for it."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    target = engine_dir / UNIVERSAL_TAG
    if (not dist.is_initialized() or dist.get_rank() == 0) and not target.is_dir():
        with atomic_directory(target) as tmp:
            args = Namespace(
                input_folder=str(engine_dir / CHECKPOINT_TAG),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
            # The converter calls torch.load(weights_only=False); torch's documented switch forces
            # weights_only=True for it, with DeepSpeed's own types allowlisted.
            forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            try:
                with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
                    ds_to_universal.main(args)
            finally:
                if forced is None:
                    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
                else:
                    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
    if dist.is_initialized():
        dist.barrier()
