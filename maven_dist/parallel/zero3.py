"""ZeRO-3 backend: the HF-based MavenModel under DeepSpeed stage 3.

The model is constructed inside ``deepspeed.zero.Init`` so no rank ever holds the full 7B/13B
weights; pretrained tensors are streamed from disk and copied into each partitioned parameter
under ``GatheredParameters`` (rank 0 writes, DeepSpeed re-partitions). Frozen parts are left out
of the optimizer's parameter groups, so ZeRO keeps no fp32 master copy or Adam moments for them.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from maven_dist.config import Config
from maven_dist.data.batch import Batch
from maven_dist.model.maven import MavenModel, ModelOutput, copy_param
from maven_dist.parallel.checkpoint_engine import DEEPSPEED_SAFE_GLOBALS, WeightsOnlyCheckpointEngine
from maven_dist.parallel.dims import ParallelDims
from maven_dist.train.engine import build_optimizer
from maven_dist.train.parts import apply_trainable

CHECKPOINT_TAG = "zero"
UNIVERSAL_TAG = "universal"


def build_ds_config(cfg: Config, dims: ParallelDims, accumulation: int, load_universal: bool = False) -> dict:
    """DeepSpeed config generated from the recipe (one source of truth for batch sizes and precision)."""
    stage = cfg.stage
    bf16 = stage.dtype == "bf16" and torch.cuda.is_available()  # CPU runs are always fp32
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": stage.micro_batch_size * accumulation * dims.dp,
        "gradient_clipping": stage.optimizer.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": torch.cuda.is_available(),
            "contiguous_gradients": True,
            # DeepSpeed's GPU defaults; on CPU they would allocate ~2 GB buffers per rank for nothing.
            "reduce_bucket_size": 5e8 if torch.cuda.is_available() else 5e7,
            "stage3_prefetch_bucket_size": 5e8 if torch.cuda.is_available() else 5e7,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # We pass a torch AdamW over the trainable groups; DeepSpeed wraps it in its ZeRO-3 optimizer.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Resuming on another number of ranks goes through DeepSpeed's universal checkpoint format.
        "checkpoint": {"load_universal": load_universal},
    }


def zero3_copy(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Copy a full tensor into a ZeRO-3 partitioned parameter (rank 0 writes, then re-partition)."""
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if not dist.is_initialized() or dist.get_rank() == 0:
            copy_param(param, value)


class Zero3Engine:
    def __init__(
        self,
        build_model: Callable[..., MavenModel],
        cfg: Config,
        dims: ParallelDims,
        total_steps: int,
        accumulation: int,
        load_universal: bool = False,
    ):
        self.cfg = cfg.stage
        self.load_universal = load_universal
        self.ds_config = build_ds_config(cfg, dims, accumulation, load_universal)
        # DeepSpeed's comm layer adopts the process group init_distributed already created.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            model = build_model(copy_fn=zero3_copy)
        apply_trainable(model, cfg.stage.trainable)
        if cfg.stage.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer, scheduler = build_optimizer(model, cfg.stage, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
        self.module: MavenModel = self.engine.module
        self._grad_norm = math.nan

    def forward(self, batch: Batch) -> ModelOutput:
        return self.engine(batch, views=self.cfg.views, loss=self.cfg.loss)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else math.nan
        return boundary

    @property
    def grad_norm(self) -> float:
        return self._grad_norm

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        tag = CHECKPOINT_TAG
        if self.load_universal:
            maybe_convert_to_universal(Path(directory))
            tag = UNIVERSAL_TAG
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{tag}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = self.engine._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else None


def maybe_convert_to_universal(engine_dir: Path) -> None:
    """Rank 0 converts `engine_dir/zero` (written by N ranks) to DeepSpeed's rank-count-independent
    universal format in `engine_dir/universal`, once; every rank waits for it."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    target = engine_dir / UNIVERSAL_TAG
    if (not dist.is_initialized() or dist.get_rank() == 0) and not target.is_dir():
        tmp = engine_dir / (UNIVERSAL_TAG + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(
            input_folder=str(engine_dir / CHECKPOINT_TAG),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with _weights_only_torch_load():
            ds_to_universal.main(args)
        os.replace(tmp, target)
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's converter calls torch.load(weights_only=False); force weights_only=True for it."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original
