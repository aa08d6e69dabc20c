"""The step logs' memory figures: the trainer's perf meter reports its own GPU's memory (the tracker's
system sampler reports the node's)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from maven_dist.train.perf import StepMeter


@pytest.mark.gpu
def test_the_step_meter_reports_this_process_cuda_memory():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = SimpleNamespace(llm=torch.nn.Linear(2, 2), vocab_new_rows=torch.nn.Linear(2, 2))
    meter = StepMeter(model, dp=1, world_size=1)
    block = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    metrics = meter.flush()
    assert metrics["memory/gpu_allocated_gb"] >= 0.25
    assert metrics["memory/gpu_reserved_gb"] >= metrics["memory/gpu_allocated_gb"]
    assert metrics["memory/peak_allocated_gb"] >= metrics["memory/gpu_allocated_gb"]
    del block


def test_the_step_meter_logs_no_gpu_memory_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    model = SimpleNamespace(llm=torch.nn.Linear(2, 2), vocab_new_rows=torch.nn.Linear(2, 2))
    metrics = StepMeter(model, dp=1, world_size=1).flush()
    assert not [k for k in metrics if k.startswith("memory/gpu")] and metrics["memory/peak_rss_gb"] > 0
