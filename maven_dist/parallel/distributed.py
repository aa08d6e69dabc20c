"""Process-group set-up from the standard torch.distributed environment, and rank-aware printing."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed(timeout_s: int = 1800) -> DistEnv:
    """Join the process group named by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun, or the
    Slurm launcher); a plain `python` run is a world of one. NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """Largest `value` over all ranks (a plain float in a world of one)."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_reduce_mean(value: float) -> float:
    """Mean of `value` over all ranks."""
    return _all_reduce(value, dist.ReduceOp.SUM) / (dist.get_world_size() if dist.is_initialized() else 1)


def _all_reduce(value: float, op) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        file = kwargs.pop("file", sys.stdout)
        print(*args, file=file, flush=True, **kwargs)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
