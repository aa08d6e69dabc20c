"""System metrics for the tracker: CPU, memory, and GPU memory of rank 0's node, sampled with psutil.

Sampled here rather than through ``mlflow.enable_system_metrics_logging``: MLflow's monitor logs through
its own client and fluent run, outside the tracker's buffer, so it would block or spam errors while the
store is unreachable. These samples go through the same buffered, outage-proof path as training metrics.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

GB = 1024**3


def sample_system_metrics() -> dict[str, float]:
    """One sample: ``system/*`` (node CPU and memory, this process's RSS) and, if torch already uses CUDA,
    ``memory/gpu_*`` for this process's device."""
    out: dict[str, float] = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        vm = psutil.virtual_memory()
        out["system/cpu_percent"] = psutil.cpu_percent(interval=None)
        out["system/memory_used_gb"] = (vm.total - vm.available) / GB
        out["system/memory_percent"] = vm.percent
        out["system/process_rss_gb"] = psutil.Process(os.getpid()).memory_info().rss / GB
    torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just to sample
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated() / GB
        out["memory/gpu_reserved_gb"] = torch.cuda.memory_reserved() / GB
        out["memory/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


class SystemMetricsSampler:
    """A daemon thread calling ``emit(sample)`` every ``interval_s`` seconds until :meth:`stop`."""

    def __init__(self, interval_s: float, emit: Callable[[dict[str, float]], None]) -> None:
        self.interval_s = interval_s
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> None:
        sample_system_metrics()  # psutil's first cpu_percent(None) is a meaningless 0.0: prime it
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = sample_system_metrics()
            if sample:
                self._emit(sample)
