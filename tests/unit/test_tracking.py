"""The tracker against real stores: a SQLite file, and a TCP port with nothing listening.

No mocks: "unreachable" is a real closed port on 127.0.0.1, so the HTTP client really fails; the
server-kill-and-return scenario is tests/integration/test_mlflow_server.py, a SIGKILLed stage is
tests/integration/test_train_cli.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from maven_dist.cli.sync import main as sync_cli
from maven_dist.config import Config
from maven_dist.train.metrics_file import read_metrics
from maven_dist.train.tracking import MLflowTracker, NullTracker, build_tracker, resolve_tracking_uri
from maven_dist.train.tracking.report import build_report, find_runs_in_stores, group_arms
from maven_dist.train.tracking.run_info import clip, flatten_params, resolve_launch_id
from maven_dist.train.tracking.sync import RunRecord, is_synced, sync_record
from maven_dist.train.tracking.tracker import sample_system_metrics

LOGGER = "maven_dist.train.tracking"


@pytest.fixture(autouse=True)
def _mlflow_http_env(monkeypatch):
    """The tracker sets these process-wide (with setdefault); keep that from leaking into other tests."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database, built once: creating one costs ~2 s of migrations."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def make_cfg(run_dir: Path, empty_store: Path, **tracking) -> Config:
    """A config whose default store (run_dir/mlflow.db) starts as a copy of the empty template."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "mlflow.db").exists():
        shutil.copyfile(empty_store, run_dir / "mlflow.db")
    cfg = Config(run_dir=str(run_dir))
    cfg.tracking.experiment = "maven-test"
    cfg.tracking.flush_interval_s = 0.2
    cfg.tracking.system_metrics_interval_s = 0.0
    for key, value in tracking.items():
        setattr(cfg.tracking, key, value)
    return cfg


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def stage_runs(client, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return {r.data.tags.get("maven.stage", "<parent>"): r for r in runs}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(cfg: Config, stage: str, steps, params=None, status="FINISHED", world_size=1) -> MLflowTracker:
    """One stage process's tracking, as the trainer does it."""
    tracker = build_tracker(cfg, rank=0, world_size=world_size)
    tracker.start_stage(stage, params=params)
    for step in steps:
        tracker.log_metrics({"loss/lm": 5.0 - step * 0.01, "perf/tokens_per_s": 1000.0 + step}, step=step)
    tracker.end_stage(status)
    tracker.close()
    return tracker


# --------------------------------------------------------------------------- no store


def test_other_ranks_get_a_null_tracker_and_disabled_tracking_only_records(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    assert type(build_tracker(cfg, rank=1)) is NullTracker
    cfg.tracking.enabled = False
    run_stage(cfg, "stage1", range(3))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "stage1" / "metrics.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "run" / "mlflow.db").exists()  # no store was made


def test_launch_id_comes_from_env_else_one_file_per_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MAVEN_LAUNCH_ID", raising=False)
    first = resolve_launch_id(tmp_path)
    assert (tmp_path / "launch_id").read_text().strip() == first
    assert resolve_launch_id(tmp_path) == first  # a later stage in the same run dir: same launch
    assert resolve_launch_id(tmp_path / "other") != first
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "sweep-7.alpha_0.1")
    assert resolve_launch_id(tmp_path) == "sweep-7.alpha_0.1"
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "x' OR 1=1")
    with pytest.raises(ValueError, match=r"\$MAVEN_LAUNCH_ID"):
        resolve_launch_id(tmp_path)


def test_params_are_flattened_and_fit_mlflow_limits():
    flat = flatten_params(Config().to_dict())
    assert flat["stage.optimizer.lr"] == "2e-05"
    assert flat["stage.optimizer.betas"] == "[0.9, 0.999]"
    assert flat["stage.optimizer.part_lr"] == "{}"
    assert flat["model.llm.num_layers"] == "32"
    long = clip({"k" * 300: "v", "k" * 299 + "x": "v", "big": "x" * 10_000}, 6000)
    assert all(len(k) <= 250 for k in long) and len(long) == 3
    assert len(long["big"]) == 6000 and long["big"].endswith("[truncated]")


# --------------------------------------------------------------------------- a real SQLite store


def test_stages_nest_under_one_parent_and_a_resumed_stage_reopens_its_run(tmp_path, empty_store, monkeypatch):
    monkeypatch.delenv("MAVEN_LAUNCH_ID", raising=False)
    cfg = make_cfg(tmp_path / "run", empty_store, system_metrics_interval_s=0.01)
    extra = {f"trainer.extra_{i:03d}": i for i in range(60)}  # with the config: > 100 params (chunked)
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    run_stage(cfg, "stage1", range(30), params=extra, world_size=4)
    monkeypatch.delenv("SLURM_JOB_ID")
    run_stage(cfg, "stage2", range(10), params=extra, status="KILLED", world_size=4)  # preempted at step 9
    cfg.stage.log_every = 3  # the resumed job changed a param: kept, change recorded as a tag
    run_stage(cfg, "stage2", range(10, 20), params=extra, world_size=4)

    uri = resolve_tracking_uri(cfg)
    client = client_for(uri)
    runs = stage_runs(client, "maven-test")
    assert sorted(runs) == ["<parent>", "stage1", "stage2"]
    parent = runs["<parent>"]
    assert parent.data.tags["maven.run_kind"] == "launch"
    assert parent.info.status == "FINISHED"  # follows its latest stage
    for name in ("stage1", "stage2"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert len(params) > 100 and params["trainer.extra_059"] == "59"
        assert params["parallel.world_size"] == "4" and params["parallel.dp"] == "4"
        assert params["stage.optimizer.lr"] == "2e-05"
        assert params["env.git_sha"] and params["env.version.mlflow"] not in ("", "absent")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "resolved_recipe.yaml" in artifacts

    stage1 = runs["stage1"]
    assert stage1.data.tags["slurm.job_id"] == "111"
    assert stage1.data.tags["maven.resume_count"] == "0"
    assert any(k.startswith("system/") for k in stage1.data.metrics)
    assert len(client.get_metric_history(stage1.info.run_id, "loss/lm")) == 30

    stage2 = runs["stage2"]
    assert stage2.data.tags["maven.resume_count"] == "1"
    assert stage2.data.params["stage.log_every"] == "10"
    assert stage2.data.tags["maven.param_changed.stage.log_every"] == "10 -> 3"
    history = client.get_metric_history(stage2.info.run_id, "loss/lm")
    assert sorted(m.step for m in history) == list(range(20))  # one curve across the resume

    # Artifacts live beside the SQLite file, not in whatever the current directory was.
    exp = client.get_experiment_by_name("maven-test")
    assert exp.artifact_location == (tmp_path / "run" / "mlartifacts").resolve().as_uri()
    # Syncing again sends nothing twice.
    assert all(is_synced(RunRecord(tmp_path / "run" / s), uri) for s in ("stage1", "stage2"))
    assert sync_cli([str(tmp_path / "run")]) == 0
    assert len(client.get_metric_history(stage2.info.run_id, "loss/lm")) == 20


def test_bad_metric_values_and_calls_out_of_order_never_raise(tmp_path, empty_store, caplog):
    cfg = make_cfg(tmp_path / "run", empty_store)
    tracker = build_tracker(cfg, rank=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker.log_metrics({"loss/lm": 1.0}, step=0)  # before start_stage: dropped with a warning
        tracker.start_stage("stage3")
        tracker.log_metrics(
            {"loss/lm": 2.0, "bad": object(), "weird key!?": 3.0, "nan": float("nan")}, step=1
        )
        tracker.log_artifact(tmp_path / "does-not-exist.json")
        tracker.end_stage("FINISHED")
        tracker.end_stage("FINISHED")  # twice: ignored
        tracker.close()
    text = caplog.text
    assert "before start_stage" in text and "'bad'" in text and "does-not-exist.json" in text
    run = stage_runs(client_for(resolve_tracking_uri(cfg)), "maven-test")["stage3"]
    assert run.data.metrics["loss/lm"] == 2.0
    assert run.data.metrics["weird key__"] == 3.0
    assert "bad" not in run.data.metrics
    assert "nan" in run.data.metrics


def test_compare_reads_final_metrics_and_shows_only_params_that_differ(
    tmp_path, empty_store, monkeypatch, capsys
):
    store = tmp_path / "shared.db"
    shutil.copyfile(empty_store, store)
    for launch, lr, loss in (("ablation-a", 1e-3, 1.5), ("ablation-b", 2e-4, 1.25)):
        monkeypatch.setenv("MAVEN_LAUNCH_ID", launch)
        cfg = make_cfg(tmp_path / launch, empty_store, uri=f"sqlite:///{store}")
        cfg.stage.optimizer.lr = lr
        tracker = build_tracker(cfg, rank=0)
        tracker.start_stage("stage3")
        tracker.log_metrics({"loss/lm": 9.0}, step=0)
        tracker.log_metrics({"loss/lm": loss}, step=1)
        tracker.end_stage("FINISHED")

    runs = find_runs_in_stores([f"sqlite:///{store}"], experiments=["maven-test"], stages=["stage3"])
    assert [(r.launch_id, r.stage) for r in runs] == [("ablation-a", "stage3"), ("ablation-b", "stage3")]
    assert [r.metrics["loss/lm"] for r in runs] == [1.5, 1.25]
    table = build_report(group_arms(runs)).main
    assert list(table["stage.optimizer.lr"]) == ["0.001", "0.0002"]
    assert "stage.optimizer.betas" not in table and "model.llm.num_layers" not in table
    assert "run_dir" not in table and "run_dir" in build_report(group_arms(runs), all_params=True).main

    from maven_dist.cli.compare import main

    assert main(["--uri", f"sqlite:///{store}", "--stage", "stage3"]) == 0
    out = capsys.readouterr().out
    assert "ablation-a" in out and "ablation-b" in out and "stage3" in out and "stage.optimizer.lr" in out
    assert main(["--uri", f"sqlite:///{store}", "--experiment", "nope"]) == 2


def test_a_run_deleted_mid_stage_is_made_again_from_the_record(tmp_path, empty_store, caplog):
    cfg = make_cfg(tmp_path / "run", empty_store)
    tracker = build_tracker(cfg, rank=0)
    tracker.start_stage("stage2")
    tracker.log_metrics({"loss/lm": 1.0}, step=0)
    assert tracker.flush()
    client = client_for(resolve_tracking_uri(cfg))
    client.delete_run(stage_runs(client, "maven-test")["stage2"].info.run_id)  # from the UI, mid-stage
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(1, 50):
            tracker.log_metrics({"loss/lm": 1.0}, step=step)
        assert not tracker.flush()  # refused: warned once, training goes on
        assert tracker.flush()  # the record makes the run again
        tracker.end_stage("FINISHED")
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1
    run = stage_runs(client, "maven-test")["stage2"]
    assert len(client.get_metric_history(run.info.run_id, "loss/lm")) == 50


# --------------------------------------------------------------------------- an unreachable store


def test_unreachable_store_never_blocks_and_maven_sync_sends_the_record_later(
    tmp_path, empty_store, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "offline-launch")
    cfg = make_cfg(tmp_path / "run", empty_store, uri=f"http://127.0.0.1:{closed_port()}")
    threads_before = set(threading.enumerate())  # other tests of this worker may have left some
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = build_tracker(cfg, rank=0)
        tracker.start_stage("stage4", params={"p": 1})
        tracker.log_dict({"zero_optimization": {"stage": 3}}, "deepspeed_config.json")
        start = time.monotonic()
        for step in range(2000):
            tracker.log_metrics({"loss/lm": 10.0 - step * 1e-3, "perf/tokens_per_s": 1e4}, step=step)
        logging_time = time.monotonic() - start
        started = set(threading.enumerate()) - threads_before
        assert not started, f"the tracker runs no thread (forks must not inherit one): {started}"
        start = time.monotonic()
        tracker.end_stage("FINISHED")
        closing_time = time.monotonic() - start
    assert logging_time < 5.0, logging_time  # retried after a doubling pause, not at every step
    assert closing_time < 5.0, closing_time  # one failed attempt
    assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1  # warned once

    # The server never comes back: send the record to a local SQLite store instead.
    target = f"sqlite:///{tmp_path / 'recovered.db'}"
    shutil.copyfile(empty_store, tmp_path / "recovered.db")
    assert sync_cli([str(tmp_path / "run")]) == 1  # to the store it names: still unreachable
    assert sync_cli([str(tmp_path / "run"), "--uri", target]) == 0
    assert "synced 1 run records (4000 metric values" in capsys.readouterr().out
    assert sync_cli([str(tmp_path / "run"), "--uri", target]) == 0  # again: nothing new, nothing twice
    assert "(0 metric values" in capsys.readouterr().out
    client = client_for(target)
    run = stage_runs(client, "maven-test")["stage4"]
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss/lm")) == 2000
    assert run.data.params["p"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"deepspeed_config.json", "resolved_recipe.yaml"} <= artifacts


def test_the_next_stage_sends_the_records_an_earlier_one_could_not(
    tmp_path, empty_store, monkeypatch, caplog
):
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "replayed")
    cfg = make_cfg(tmp_path / "run", empty_store)
    uri = resolve_tracking_uri(cfg)
    down = make_cfg(tmp_path / "run", empty_store, uri=uri.replace("mlflow.db", "missing/dir/\0.db"))
    run_stage(down, "stage1", range(5))  # the store failed: the record waits
    # Each record names its store: rewrite stage1's to the real one, as if that store had been down.
    record = RunRecord(tmp_path / "run" / "stage1")
    record.data["uri"] = uri
    record.save()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_stage(cfg, "stage2", range(3))  # the next stage's process
    assert "sending 1 earlier runs' records" in caplog.text
    client = client_for(uri)
    runs = stage_runs(client, "maven-test")
    assert sorted(runs) == ["<parent>", "stage1", "stage2"]
    assert len(client.get_metric_history(runs["stage1"].info.run_id, "loss/lm")) == 5
    assert runs["stage1"].info.start_time < runs["stage2"].info.start_time
    assert runs["<parent>"].info.status == "FINISHED"


def test_a_record_sent_twice_after_a_crash_mid_sync_has_each_value_once(tmp_path, empty_store):
    cfg = make_cfg(tmp_path / "run", empty_store, enabled=False)
    run_stage(cfg, "stage3", range(1500))  # two batches of metric values
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    record = RunRecord(tmp_path / "run" / "stage3")
    assert sync_record(record, uri) == 3000
    # A crash after the store took the batches but before synced.json said so: offsets back to the start.
    synced = json.loads(record.synced_file.read_text())
    synced[uri]["offset"] = record.data["metrics_from"]
    record.synced_file.write_text(json.dumps(synced))
    assert sync_record(record, uri) == 3000
    client = client_for(uri)
    run = stage_runs(client, "maven-test")["stage3"]
    assert len(client.get_metric_history(run.info.run_id, "loss/lm")) == 1500


# --------------------------------------------------------------------------- system metrics


def test_system_metrics_sample_node_cpu_and_memory():
    sample = sample_system_metrics()
    assert 0.0 <= sample["system/memory_percent"] <= 100.0
    assert 0.0 < sample["system/process_rss_gb"] < sample["system/memory_used_gb"] + 1.0
    assert sample["system/cpu_percent"] >= 0.0


def test_the_cluster_tracking_server_applies_where_a_recipe_names_none(tmp_path, monkeypatch):
    cfg = Config(run_dir=str(tmp_path))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MAVEN_TRACKING_URI", "http://mlflow.cluster:5000")
    assert resolve_tracking_uri(cfg) == "http://mlflow.cluster:5000"
    cfg.tracking.uri = "sqlite:///{run_dir}/own.db"
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/own.db", "the recipe's setting wins"
