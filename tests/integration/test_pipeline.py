"""The README's main job end to end: four tiny stages on 2 CPU ranks, logged to a real MLflow server
that dies in the middle of stage 3 and comes back during stage 4; then the recipe's evaluation."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from maven_dist.train.metrics_file import read_metrics
from maven_dist.train.tracking.sync import PARENT_KIND
from tests.helpers.loss_curves import check_loss_curves
from tests.helpers.mlflow_server import MlflowServer, wait_until
from tests.helpers.torchrun import REPO, cpu_env, free_port
from tests.unit.test_merge import same_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STAGES = ("stage1", "stage2", "stage3", "stage4")
README_LIMIT_S = 600
WARNING = re.compile(r"\w+Warning: |\[WARNING\]")  # issue 4: the main job on 2 CPU ranks in under 10 minutes


def logged_steps(path) -> int:
    return len(read_metrics(path)) if path.is_file() else 0


@pytest.fixture
def server(tmp_path):
    """A tracking server the test kills and restarts; torn down whatever state the test leaves it in."""
    (tmp_path / "server").mkdir()
    srv = MlflowServer(tmp_path / "server", free_port())
    srv.start()
    yield srv
    srv.kill()


def test_main_job_two_ranks_survives_a_tracking_outage(server, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "maven_dist.pipeline",
        "tests/recipes/tiny",
        "--nproc",
        "2",
        f"--set=run_dir={run_dir}",
        f"--set=tracking.uri={server.uri}",
        "--set=tracking.flush_interval_s=0.5",
        "--set=stage.val_image_control=true",  # off in tests/recipes/tiny/ci.yaml
        "--set=stage.max_steps=12",  # 20 in tests/recipes/tiny: a checkpoint at step 10, the end at 12
    ]
    start = time.monotonic()
    log = (tmp_path / "pipeline.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until(
            lambda: logged_steps(run_dir / "stage3" / "metrics.jsonl") >= 5 or proc.poll() is not None,
            timeout=600,
        )
        server.kill()  # mid-stage 3
        wait_until(lambda: (run_dir / "stage4").is_dir() or proc.poll() is not None, timeout=600)
        server.start()  # back during stage 4 (or, on a slow machine, by the end: the pipeline syncs the records)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        elapsed = time.monotonic() - start
    assert code == 0, (tmp_path / "pipeline.log").read_text()[-6000:]
    assert elapsed < README_LIMIT_S, f"main job took {elapsed:.0f} s"
    check_loss_curves(run_dir, STAGES)
    # Quiet logs (issue 17): the known third-party warnings are filtered once, not printed by every rank.
    warned = [line for line in (tmp_path / "pipeline.log").read_text().splitlines() if WARNING.search(line)]
    assert len(warned) < 20, "\n".join(warned[:40])

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("maven-tiny")
    wait_until(lambda: len(client.search_runs([experiment.experiment_id])) >= 6, timeout=60)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("maven.run_kind") == PARENT_KIND]
    assert len(parents) == 1
    stages = {
        r.data.tags["maven.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert set(stages) == {*STAGES, "eval-stage4"}
    for name in STAGES:
        run = stages[name]
        assert run.data.params["stage.name"] == name
        assert run.data.params["parallel.dp"] == "2"
        local = read_metrics(run_dir / name / "metrics.jsonl")
        history = client.get_metric_history(run.info.run_id, "loss/total")
        # Every step of every stage, the outage included, reached the store with the value the trainer logged.
        assert sorted((m.step, m.value) for m in history) == [
            (row["step"], row["loss/total"]) for row in local
        ], name
        assert run.info.status == "FINISHED"
        val = [(row["step"], row["val/loss"]) for row in local if "val/loss" in row]
        assert val and val[-1][0] == local[-1]["step"], f"{name}: no val/loss at the end of the stage"
        assert (
            sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")) == val
        )
        # The validation's image control ran on 2 ZeRO-3 ranks, where the stage has a language-model loss.
        gains = [row for row in local if "val/visual_gain" in row]
        assert bool(gains) == (name != "stage1") and all(
            math.isfinite(r["val/visual_gain"]) for r in gains
        ), name
        if name != "stage2":  # every stage that runs the selector: h_eos varies with the image (issue 12)
            spreads = [row["selector/h_eos_spread"] for row in local if "selector/h_eos_spread" in row]
            assert len(spreads) == len(local), f"{name}: h_eos spread missing at some steps"
            # The defect had 2e-4; stage 4 (the LLM training) ends near 0.05 here since stage 3's lr is 3e-3.
            assert min(spreads) >= 0.02, f"{name}: h_eos barely depends on the image ({min(spreads):.2e})"

    # The recipe ends with the synthetic benchmarks scored on the stage-4 export (issue 14).
    evaluation = stages["eval-stage4"]
    assert evaluation.info.status == "FINISHED"
    scored = {k for k in evaluation.data.metrics if k.startswith("eval/")}
    assert {"eval/vqav2/accuracy", "eval/mme/total", "eval/mmbench/circular_gen"} <= scored, scored

    # The trained model runs: a `maven merge` of the stage's 2-rank ZeRO-3 checkpoint is the stage-4 export,
    # bitwise (so it answers as the export does), and the README's chat command answers on it (issue 13).
    images = run_dir / "data" / "synthetic" / "images"
    merged = tmp_path / "merged"
    maven = [sys.executable, "-m", "maven_dist.cli"]
    merge = subprocess.run([*maven, "merge", str(run_dir / "stage4"), str(merged)], cwd=REPO, env=cpu_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert merge.returncode == 0, merge.stderr[-3000:]
    same_tree(merged, run_dir / "stage4" / "export")  # 2 ranks' even ZeRO-3 partitions merge bitwise
    question = ["--image", str(images / "00000.png"), "--image", str(images / "00001.png"),
                "which image has more circles ?"]  # fmt: skip
    out = subprocess.run([*maven, "chat", str(merged), "--max-new-tokens", "8", *question],
                         cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("\n")
