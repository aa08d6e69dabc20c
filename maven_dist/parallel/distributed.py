"""Process-group set-up from the standard torch.distributed environment, and rank-aware helpers.

Two rules every collective of the package follows (docs/architecture.md, "Collectives"):

* **Tensors on the engine's device.** NCCL serves CUDA tensors only ("No backend type associated with
  device type cpu"); gloo serves CPU tensors. The scalar helpers here take the device explicitly, and
  every tensor the package hands to a collective is created on it (``tests/distributed/
  test_collective_devices.py`` records each one against ``engine.device``).
* **Two timeouts.** The training collectives (gradients, losses, the per-step checks) run on the
  default group with :data:`COLLECTIVE_TIMEOUT_S`: a rank that stops answering ends the job in minutes,
  not after torch's default of 30 (NCCL's watchdog aborts the process, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
  defaults to 3 since torch 2.2). Waits for host-side work of one rank (rank 0 writing an export,
  converting a checkpoint) go through :func:`barrier` on a separate gloo group with
  :data:`HOST_WAIT_TIMEOUT_S`: such work can legitimately take longer than any collective should.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = int(os.environ.get("MAVEN_COLLECTIVE_TIMEOUT_S", "600"))
"""Timeout of the training collectives (``MAVEN_COLLECTIVE_TIMEOUT_S``, default 10 minutes)."""
HOST_WAIT_TIMEOUT_S = int(os.environ.get("MAVEN_HOST_WAIT_TIMEOUT_S", str(3 * 3600)))
"""Timeout of :func:`barrier` (``MAVEN_HOST_WAIT_TIMEOUT_S``, default 3 hours): one rank's file work."""

_host_group: dist.ProcessGroup | None = None


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


def init_distributed(timeout_s: int | None = None) -> DistEnv:
    """Join the process group named by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun, or the
    Slurm launcher); a plain `python` run is a world of one. NCCL on GPU (bound to this rank's device),
    gloo on CPU; a second, gloo group carries :func:`barrier` (see the module doc)."""
    global _host_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or COLLECTIVE_TIMEOUT_S)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            # device_id binds the group to this rank's GPU: barriers and object collectives use it
            # instead of guessing (torch warns "devices used by this process are currently unknown").
            dist.init_process_group("nccl", timeout=timeout, device_id=env.device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        _host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=HOST_WAIT_TIMEOUT_S))
    return env


def barrier() -> None:
    """Wait for every rank, e.g. while rank 0 writes files: on the gloo group with the long timeout."""
    if dist.is_initialized():
        dist.barrier(group=_host_group)


def all_reduce_max(value: float, device: torch.device) -> float:
    """Largest `value` over all ranks (a plain float in a world of one); the collective runs on `device`,
    the engine's (NCCL takes CUDA tensors only)."""
    return _all_reduce(value, dist.ReduceOp.MAX, device)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of `value` over all ranks, reduced on `device` (the engine's)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _all_reduce(value, dist.ReduceOp.SUM, device) / world


def _all_reduce(value: float, op: dist.ReduceOp, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        file = kwargs.pop("file", sys.stdout)
        print(*args, file=file, flush=True, **kwargs)


def destroy() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None
