"""The hardware label every bench prints beside its numbers (docs/performance.md quotes it).

from _hardware import hardware          # in a bench run as a script (bench/ is on sys.path)
print(f"hardware: {hardware()}")        # CPU model, cores, RAM, torch and its threads
print(f"hardware: {hardware('cuda')}")  # the GPU first, then the host
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) / 2**20
    return None


def hardware(device: str | torch.device | None = None) -> str:
    """One line naming what the numbers were measured on: the GPU when `device` is a CUDA device,
    then the host (CPU model, visible cores, RAM, OS) and torch with its intra-op thread count."""
    ram = memory_gib()
    host = ", ".join(
        [
            cpu_model(),
            f"{os.cpu_count()} cores",
            *([f"{ram:.0f} GiB RAM"] if ram is not None else []),
            f"{platform.system()} {platform.release()}",
            f"torch {torch.__version__} ({_count(torch.get_num_threads(), 'thread')})",
        ]
    )
    if device is not None and torch.device(device).type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        return f"{gpu} x{torch.cuda.device_count()} (CUDA {torch.version.cuda}); host: {host}"
    return host


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
