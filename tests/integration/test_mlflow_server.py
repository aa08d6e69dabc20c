"""A real ``mlflow server`` on 127.0.0.1: four nested stage runs under one parent, and an outage mid-stage.

The server is killed (SIGKILL, as a crashed or rebooted host would be) in the middle of stage 3 while the
stand-in training loop keeps logging, and comes back (same port, same store) only in the middle of stage 4:

* stage 3 finishes while the server is down: its end does not wait long, and its record stays unsent;
* stage 4 starts while the server is still down, and when it returns mid-stage sends stage 3's record, then
  its own.

Every metric logged during the outage must be in the store at the end. The end-to-end trainer test
(tests/integration/test_pipeline.py) covers the same path through the real trainer.
"""

from __future__ import annotations

import csv
import logging
import time

import pytest

from maven_dist.config import Config
from maven_dist.train.tracking import MLflowTracker, build_tracker
from maven_dist.train.tracking.sync import is_synced
from tests.helpers.mlflow_server import MlflowServer
from tests.helpers.torchrun import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STAGES = ("stage1", "stage2", "stage3", "stage4")
STEPS = 40
KILL_AT = 20  # the server dies before stage 3's step 20 ...
RESTART_AT = 20  # ... and is back before stage 4's step 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the file (starting one takes ~20 s); each test uses an experiment of its own."""
    srv = MlflowServer(tmp_path_factory.mktemp("server"), free_port())
    srv.start()
    yield srv
    srv.kill()


def test_four_nested_stages_and_a_server_outage_mid_stage(server, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MAVEN_LAUNCH_ID", raising=False)  # the launch id file in run_dir links the stages
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.tracking.uri = server.uri
    cfg.tracking.experiment = "maven-it"
    cfg.tracking.flush_interval_s = 0.2
    cfg.tracking.system_metrics_interval_s = 0.0

    caplog.set_level(logging.INFO, logger="maven_dist.train.tracking")

    def warned(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    for stage in STAGES:
        # One tracker per stage: the pipeline runs each stage as its own process.
        tracker = build_tracker(cfg, rank=0, world_size=2)
        assert isinstance(tracker, MLflowTracker)
        tracker.start_stage(stage, params={"trainer.stage_index": STAGES.index(stage)})
        tracker.log_dict({"train_micro_batch_size_per_gpu": 1}, "deepspeed_config.json")
        for step in range(STEPS):
            if (stage, step) == ("stage3", KILL_AT):
                assert tracker.flush(), "steps before the outage reach the live server"
                server.kill()
            if (stage, step) == ("stage4", RESTART_AT):
                assert warned("is unreachable") == 2  # stage 4 noticed, and kept going
                server.start()
            tracker.log_metrics({"loss/lm": 4.0 - 0.01 * step, "perf/tokens_per_s": 1000.0 + step}, step=step)
            time.sleep(0.02)  # a training step
        started = time.monotonic()
        tracker.end_stage("FINISHED")
        synced = is_synced(tracker.record, server.uri)
        if stage == "stage3":
            assert time.monotonic() - started < 10, (
                "an unreachable server must not hold up the end of a stage"
            )
            assert not synced, "stage 3's record waits for the server"
        else:
            assert synced and not tracker.pending, "everything was sent"

    assert warned("is unreachable") == 2  # once by stage 3's tracker, once by stage 4's
    assert warned("reachable again") == 1  # stage 4 recovered
    assert warned("sending 1 earlier runs' records") == 1  # stage 4 took over stage 3's record

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("maven-it")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("maven.run_kind") == "launch"]
    stage_runs = {r.data.tags["maven.stage"]: r for r in runs if r.data.tags.get("maven.run_kind") == "stage"}
    assert len(parents) == 1 and len(runs) == 5
    assert sorted(stage_runs) == list(STAGES)
    for stage, run in stage_runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["trainer.stage_index"] == str(STAGES.index(stage))
        assert run.data.params["parallel.world_size"] == "2"
        history = client.get_metric_history(run.info.run_id, "loss/lm")
        assert sorted(m.step for m in history) == list(range(STEPS)), stage
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"resolved_recipe.yaml", "deepspeed_config.json"} <= artifacts

    # The outages' metrics carry the time they were logged, not the time they were flushed.
    for stage, lo, hi in (("stage3", KILL_AT, STEPS), ("stage4", 0, RESTART_AT)):
        outage = sorted(
            (
                m
                for m in client.get_metric_history(stage_runs[stage].info.run_id, "perf/tokens_per_s")
                if lo <= m.step < hi
            ),
            key=lambda m: m.step,
        )
        assert [m.value for m in outage] == [1000.0 + s for s in range(lo, hi)], stage
        assert all(a.timestamp < b.timestamp for a, b in zip(outage, outage[1:], strict=False)), stage


def test_compare_merges_a_tracking_server_and_a_run_directory(server, tmp_path, capsys):
    """Two arms on the server, one in a run directory's SQLite store: one report over both, logged back
    to a parent run on the server as the sweep launcher does."""
    from mlflow import MlflowClient

    from maven_dist.cli.compare import main
    from maven_dist.sweep.report import log_report
    from maven_dist.train.tracking.report import (
        HISTORY_KEYS,
        find_runs_in_stores,
        group_arms,
        load_histories,
        write_report,
    )
    from tests.helpers.mlflow_runs import BASE_PARAMS, LaunchLog, StageLog, log_launch

    def arm(launch_id: str, keep_ratio: str, val: list[float]) -> LaunchLog:
        params = {**BASE_PARAMS, "model.selector.keep_ratio": keep_ratio, "stage.name": "stage4"}
        metrics = {"loss/total": [(0, 2.0), (4, 1.0)], "val/loss": [(2 * i, v) for i, v in enumerate(val)]}
        return LaunchLog(
            launch_id, [StageLog("stage4", params, metrics)], evals={"eval/synth_vqa/accuracy": 0.5}
        )

    run_dir = tmp_path / "local"
    run_dir.mkdir()
    parent = log_launch(server.uri, "maven-compare", arm("server-a", "0.1", [0.9, 0.7]))
    log_launch(server.uri, "maven-compare", arm("server-b", "0.25", [0.8, 0.6, 0.65]))
    log_launch(f"sqlite:///{run_dir / 'mlflow.db'}", "maven-compare", arm("local-c", "1.0", [1.0]))

    out = tmp_path / "report.csv"
    argv = [
        "--uri",
        server.uri,
        "--run-dir",
        str(run_dir),
        "--experiment",
        "maven-compare",
        "--csv",
        str(out),
    ]
    assert main(argv) == 0
    assert "server-b" in capsys.readouterr().out
    rows = {r["arm"]: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == ["local-c", "server-a", "server-b"]
    assert rows["server-a"]["store"] == f"127.0.0.1:{server.port}" and rows["local-c"]["store"] == "local"
    assert [rows[a]["model.selector.keep_ratio"] for a in ("server-a", "server-b", "local-c")] == [
        "0.1",
        "0.25",
        "1.0",
    ]
    assert (rows["server-b"]["val/loss final"], rows["server-b"]["val/loss best"]) == ("0.65", "0.6")
    assert rows["local-c"]["visual tokens/image"] == str(32 + 576)
    assert rows["server-a"]["eval/synth_vqa/accuracy"] == "0.5"

    runs = find_runs_in_stores([server.uri], ["maven-compare"])
    load_histories(runs, HISTORY_KEYS)
    log_report(server.uri, parent, write_report(group_arms(runs), tmp_path / "report"))
    client = MlflowClient(tracking_uri=server.uri)
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.html", "report/plots"}
