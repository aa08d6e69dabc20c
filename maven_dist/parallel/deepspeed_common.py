"""What the two DeepSpeed engines (ZeRO-3 and 3D) share: the config skeleton, the process-group join,
checkpoint I/O that never unpickles code, and the per-step accessors."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from maven_dist.config import Config
from maven_dist.parallel.dims import ParallelDims

# The only non-container types DeepSpeed writes into our ZeRO-3 and pipeline + ZeRO-1 checkpoints
# (found by loading every file of saved checkpoints with weights_only=True). Each rebuilds from
# plain attributes; allowing them lets no other class or callable through.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, fragment_address]


def base_ds_config(cfg: Config, dims: ParallelDims, accumulation: int) -> dict:
    """The keys both backends set the same way; each adds its ``zero_optimization`` and extras."""
    stage = cfg.stage
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": stage.micro_batch_size * accumulation * dims.dp,
        "gradient_clipping": stage.optimizer.grad_clip,
        # stage.dtype on every device: a bf16 stage on CPU runs the same casts as on a GPU (the tests' guard).
        "bf16": {"enabled": stage.dtype == "bf16"},
        # We pass a torch AdamW over the trainable groups; DeepSpeed wraps it in its ZeRO optimizer.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# DeepSpeed's CPU comm layer JIT-compiles a shared-memory all-reduce op when it starts. Only DeepSpeed
# inference's `inference_all_reduce` uses it, never a training collective, and the C++ build costs about
# a minute of both cores the first time a machine (or a new install path) runs a stage.
SHM_COMM_OP = "deepspeed_shm_comm"
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def training_dtype(stage) -> torch.dtype:
    """The dtype a stage's weights and activations have (``stage.dtype``); master weights stay fp32."""
    return torch.bfloat16 if stage.dtype == "bf16" else torch.float32


def accelerator_device() -> torch.device:
    """The device DeepSpeed's engine will put this rank on (``engine.device``), known before it exists:
    collectives issued while an engine is built take their tensors there."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def init_deepspeed_distributed() -> None:
    """DeepSpeed's comm layer adopts the process group ``init_distributed`` already created."""
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    _import_muon_uncompiled()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with its ``torch.compile`` decorator left out.

    Every ZeRO optimizer DeepSpeed builds imports Muon, only to ask whether ours is one (we pass a torch
    AdamW). That import wraps Muon's Newton-Schulz kernel in ``torch.compile``, which imports dynamo and
    inductor: 2-4 s of CPU per rank at every stage start, for a kernel we never call."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_decorator = compiler.compile
    compiler.compile = lambda: lambda fn: fn
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        compiler.compile = compile_decorator


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def __init__(self) -> None:
        super().__init__()
        # Without a config DeepSpeed falls back to torch's legacy file format, which its own
        # zero_to_fp32 (mmap) cannot read; keep the zip format every other tool expects.
        self.zipfile_serialization = True

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngineState:
    """Checkpoint, gradient-norm, learning-rate and artifact plumbing of a wrapped DeepSpeed engine.

    Subclasses set ``engine`` (the DeepSpeed engine), ``torch_optimizer`` (the AdamW they built, whose
    groups carry our names), ``ds_config`` and ``checkpoint_tag``."""

    engine: deepspeed.DeepSpeedEngine
    torch_optimizer: torch.optim.Optimizer
    ds_config: dict
    checkpoint_tag: str

    def _use_weights_only_checkpoints(self) -> None:
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine()

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.checkpoint_tag, save_latest=False)

    def _load_tag(self, directory: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{tag}")

    def _global_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.torch_optimizer.param_groups}

    def artifacts(self) -> dict[str, dict]:
        return {"deepspeed_config.json": self.ds_config}
