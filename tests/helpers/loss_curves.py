"""The tiny pipeline's loss curves against the values recorded in ``tests/integration/tiny_loss_curves.json``
(issue 22): a change that alters what training computes shows as a changed curve, not only as a failing
parity test. After a deliberate change, re-record them (and say why in the commit)::

    MAVEN_RECORD_LOSS_CURVES=1 .venv/bin/pytest tests/integration/test_pipeline.py -k outage
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from maven_dist.train.metrics_file import read_metrics

RECORDED = Path(__file__).resolve().parents[1] / "integration" / "tiny_loss_curves.json"
RECORD_ENV = "MAVEN_RECORD_LOSS_CURVES"
RTOL = 2e-3
"""Same seed, same data, same ranks: only the order of float reductions may differ between machines."""


def check_loss_curves(run_dir: Path, stages: tuple[str, ...]) -> None:
    """Compare (or, with ``MAVEN_RECORD_LOSS_CURVES=1``, record) each stage's ``loss/total`` per step."""
    curves = {
        stage: [row["loss/total"] for row in read_metrics(run_dir / stage / "metrics.jsonl")]
        for stage in stages
    }
    if os.environ.get(RECORD_ENV) == "1":
        RECORDED.write_text(json.dumps(curves, indent=1) + "\n")
        return
    recorded = json.loads(RECORDED.read_text())
    for stage in stages:
        assert curves[stage] == pytest.approx(recorded[stage], rel=RTOL), (
            f"{stage}'s loss curve moved from the recorded one; if the change is deliberate, re-record: "
            f"{RECORD_ENV}=1 .venv/bin/pytest tests/integration/test_pipeline.py -k outage"
        )
