"""Throughput, MFU and memory for the step logs.

MFU = 6 * N * T / (dt * P * W), where N is the LLM's parameter count, T the sequence positions the
LLM processed in the window by all data-parallel replicas, dt the wall time, P the per-device peak
dense bf16 FLOP/s and W the world size (every GPU, tensor and pipeline ranks included). 6N per token is the usual forward+backward estimate for dense matmuls (Kaplan et al.,
PaLM appendix B) without the attention term; for stages that freeze the LLM the backward pass still
computes activation gradients, so it stays an upper-bound-style estimate. P comes from a table of
known accelerators; on CPU no MFU is logged, only model TFLOP/s.
"""

from __future__ import annotations

import resource
import time

import torch

# Peak dense bf16 FLOP/s (vendor data sheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def _num_params(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


class StepMeter:
    """Accumulates micro-batch counts between log points and turns them into rates."""

    def __init__(self, model, dp: int, world_size: int):
        self.llm_params = _num_params(model.llm) + _num_params(model.vocab_new_rows)
        self.dp = dp
        self.world_size = world_size
        self.peak = device_peak_flops()
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        self.tokens = 0
        self.images = 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of other work (a validation pass) out of the current window's time."""
        self.start += seconds

    def add(self, samples: int, tokens: int, images: int) -> None:
        """Count one micro-batch of this replica."""
        self.samples += samples
        self.tokens += tokens
        self.images += images

    def flush(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.start, 1e-9)
        # This replica's counts times dp: every data-parallel replica processes a similar share.
        tokens_per_s = self.tokens * self.dp / dt
        flops = 6 * self.llm_params * tokens_per_s
        metrics = {
            "perf/samples_per_s": self.samples * self.dp / dt,
            "perf/tokens_per_s": tokens_per_s,
            "perf/images_per_s": self.images * self.dp / dt,
            "perf/model_tflops": flops / 1e12,
            "memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.peak:
            metrics["perf/mfu"] = flops / (self.peak * self.world_size)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
            metrics["memory/gpu_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
            metrics["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self._reset()
        return metrics
