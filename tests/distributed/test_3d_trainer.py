"""`parallel.backend: 3d` is the only switch: the trainer runs a stage on TP=2 and matches one process."""

from __future__ import annotations

import pytest
import torch

from maven_dist.train.metrics_file import read_metrics
from tests.helpers.torchrun import run_train

pytestmark = pytest.mark.distributed


def test_trainer_stage4_tensor_parallel_matches_one_process(tiny_assets, tmp_path):
    common = [
        "stage.max_steps=4",
        "stage.init_missing=base",
        "tracking.enabled=false",
        "checkpoint.every_steps=2",
    ]
    one = tmp_path / "one"
    run_train(1, "tests/recipes/tiny/stage4.yaml", tiny_assets.overrides(one, "conversations") + common)
    tp = tmp_path / "tp2"
    run_train(
        2,
        "tests/recipes/tiny/stage4.yaml",
        tiny_assets.overrides(tp, "conversations") + common + ["parallel.backend=3d", "parallel.tp=2"],
    )
    want = torch.tensor([r["loss/total"] for r in read_metrics(one / "stage4" / "metrics.jsonl")])
    got = torch.tensor([r["loss/total"] for r in read_metrics(tp / "stage4" / "metrics.jsonl")])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert (tp / "stage4" / "export" / "llm" / "config.json").is_file()
    assert (tp / "stage4" / "checkpoints" / "latest").read_text() == "step_00000004"
