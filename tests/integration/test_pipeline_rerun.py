"""Rerunning `maven pipeline` in the same run directory: finished stages are skipped, the MLflow parent and
stage runs are the same ones, and the parent run carries the recipe's name, params and results."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.torchrun import REPO, cpu_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def pipeline(tiny_assets, run_dir, *extra: str) -> subprocess.CompletedProcess:
    sets = [*tiny_assets.overrides(run_dir), "stage.max_steps=2", "eval.enabled=false"]
    cmd = [sys.executable, "-m", "maven_dist.pipeline", "tests/recipes/tiny", "--stages", "stage2", *extra]
    cmd += [f"--set={s}" for s in sets]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_a_rerun_reuses_the_runs_and_the_parent_summarises_the_launch(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    pipeline(tiny_assets, run_dir)
    again = pipeline(tiny_assets, run_dir)
    assert "stage2 already finished with this recipe" in again.stdout

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("maven-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("maven.run_kind") == "launch"]
    stages = [r for r in runs if r.data.tags.get("maven.run_kind") == "stage"]
    assert len(parents) == 1 and len(stages) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.data.tags["maven.launch_id"] == (run_dir / "launch_id").read_text().strip()
    assert parent.info.run_name == "tiny"
    assert parent.data.params["recipe"] == "tests/recipes/tiny"
    assert parent.data.params["model.selector.keep_ratio"] == "0.25"
    stage = stages[0].data.metrics
    assert parent.data.metrics["stage2/loss/total"] == pytest.approx(stage["loss/total"])
    assert parent.data.metrics["stage2/val/loss_best"] == pytest.approx(stage["val/loss"])

    # A new launch on request: the stage is still finished, so nothing runs and no run is added.
    fresh = pipeline(tiny_assets, run_dir, "--new-launch")
    assert parent.data.tags["maven.launch_id"] not in fresh.stdout
    assert len(client.search_runs([experiment.experiment_id])) == 2
