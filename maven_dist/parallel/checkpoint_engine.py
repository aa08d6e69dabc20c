"""DeepSpeed checkpoint I/O that never unpickles code: one engine for the ZeRO-3 and 3D backends."""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# The only non-container types DeepSpeed writes into our ZeRO-3 and pipeline + ZeRO-1 checkpoints
# (found by loading every file of saved checkpoints with weights_only=True). Each rebuilds from
# plain attributes; allowing them lets no other class or callable through.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, fragment_address]


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
