"""The MLflow tracker against real stores: a SQLite file, and a TCP port with nothing listening.

No mocks: "unreachable" is a real closed port on 127.0.0.1, so the HTTP client really fails; the
server-kill-and-return scenario is tests/integration/test_mlflow_server.py.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import pytest

from maven_dist.config import Config
from maven_dist.train.tracking import MLflowTracker, NullTracker, build_tracker, resolve_tracking_uri
from maven_dist.train.tracking.compare import find_runs, format_table
from maven_dist.train.tracking.ops import read_spool, write_spool
from maven_dist.train.tracking.run_info import (
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    clip_params,
    flatten_params,
    resolve_launch_id,
)
from maven_dist.train.tracking.sync import sync_spool

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
    cfg.tracking.flush_timeout_s = 20.0
    cfg.tracking.system_metrics_interval_s = 0.0
    for key, value in tracking.items():
        setattr(cfg.tracking, key, value)
    return cfg


def client_for(cfg: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(cfg))


def stage_runs(client, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return {r.data.tags.get("maven.stage", "<parent>"): r for r in runs}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- no MLflow at all


def test_other_ranks_and_disabled_tracking_get_a_null_tracker_and_write_nothing(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    assert isinstance(build_tracker(cfg, rank=1), NullTracker)
    cfg.tracking.enabled = False
    tracker = build_tracker(cfg, rank=0)
    assert isinstance(tracker, NullTracker)
    tracker.start_stage("stage1", params={"a": 1})
    tracker.log_metrics({"loss/lm": 1.0}, step=0)
    tracker.end_stage("FINISHED")
    tracker.close()
    assert not (tmp_path / "run").exists()


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
    long = clip_params({"k" * 300: "v", "k" * 299 + "x": "v", "big": "x" * 10_000})
    keys = sorted(long)
    assert all(len(k) <= MAX_KEY_LENGTH for k in keys) and len(set(keys)) == 3
    assert len(long["big"]) == MAX_PARAM_VALUE_LENGTH and long["big"].endswith("[truncated]")


# --------------------------------------------------------------------------- a real SQLite store


def test_stages_nest_under_one_parent_and_a_resumed_stage_reopens_its_run(tmp_path, empty_store, monkeypatch):
    monkeypatch.delenv("MAVEN_LAUNCH_ID", raising=False)
    cfg = make_cfg(tmp_path / "run", empty_store, system_metrics_interval_s=0.1)
    extra = {f"trainer.extra_{i:03d}": i for i in range(60)}  # with the config: > 100 params (chunked)

    # Each tracker stands in for one stage process of the pipeline.
    t1 = build_tracker(cfg, rank=0, world_size=4)
    t1.start_stage("stage1", params=extra, tags={"slurm.job_id": "111"})
    for step in range(30):
        t1.log_metrics({"loss/selector_bce": 1.0 / (step + 1), "perf/samples_per_s": 10.0 + step}, step=step)
    time.sleep(0.3)  # a few system-metric samples
    t1.end_stage("FINISHED")
    t1.close()

    t2 = build_tracker(cfg, rank=0, world_size=4)
    t2.start_stage("stage2", params=extra)
    for step in range(10):
        t2.log_metrics({"loss/lm": 5.0 - step * 0.1}, step=step)
    t2.end_stage("KILLED")  # preempted at step 9
    t2.close()

    cfg.stage.log_every = 3  # the resumed job changed a param: kept, change recorded as a tag
    t3 = build_tracker(cfg, rank=0, world_size=4)
    t3.start_stage("stage2", params=extra)
    for step in range(10, 20):
        t3.log_metrics({"loss/lm": 5.0 - step * 0.1}, step=step)
    t3.end_stage("FINISHED")
    t3.close()

    client = client_for(cfg)
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
        assert len(params) > 100
        assert params["trainer.extra_059"] == "59"
        assert params["parallel.world_size"] == "4" and params["parallel.dp"] == "4"
        assert params["stage.optimizer.lr"] == "2e-05"
        assert params["env.git_sha"] and params["env.version.mlflow"] not in ("", "absent")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"loss_curve.png", "resolved_recipe.yaml"} <= artifacts

    stage1 = runs["stage1"]
    assert stage1.data.tags["slurm.job_id"] == "111"
    assert stage1.data.tags["maven.resume_count"] == "0"
    assert any(k.startswith("system/") for k in stage1.data.metrics)
    assert len(client.get_metric_history(stage1.info.run_id, "loss/selector_bce")) == 30

    stage2 = runs["stage2"]
    assert stage2.data.tags["maven.resume_count"] == "1"
    assert stage2.data.params["stage.log_every"] == "10"
    assert stage2.data.tags["maven.param_changed.stage.log_every"] == "10 -> 3"
    history = client.get_metric_history(stage2.info.run_id, "loss/lm")
    assert sorted(m.step for m in history) == list(range(20))  # one curve across the resume

    # Artifacts live beside the SQLite file, not in whatever the current directory was.
    exp = client.get_experiment_by_name("maven-test")
    assert exp.artifact_location == (tmp_path / "run" / "mlartifacts").resolve().as_uri()
    assert not any((tmp_path / "run" / "mlflow_spool").glob("*.jsonl"))


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
    run = stage_runs(client_for(cfg), "maven-test")["stage3"]
    assert run.data.metrics["loss/lm"] == 2.0
    assert run.data.metrics["weird key__"] == 3.0
    assert "bad" not in run.data.metrics
    assert "nan" in run.data.metrics


def test_compare_runs_shows_final_metrics_and_only_params_that_differ(
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
        tracker.close()

    runs = find_runs(f"sqlite:///{store}", experiments=["maven-test"], stages=["stage3"])
    assert [r.label for r in runs] == ["ablation-a/stage3", "ablation-b/stage3"]
    table = format_table(runs)
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert lines["loss/lm"] == ["1.5", "1.25"]
    assert lines["stage.optimizer.lr"] == ["0.001", "0.0002"]
    assert "run_dir" in lines  # differs too (each launch has its own run directory)
    assert "stage.optimizer.betas" not in lines and "model.llm.num_layers" not in lines

    from maven_dist.cli.compare import main

    assert main(["--uri", f"sqlite:///{store}", "--stage", "stage3", "--metrics", "loss/"]) == 0
    assert "ablation-b/stage3" in capsys.readouterr().out
    assert main(["--uri", f"sqlite:///{store}", "--experiment", "nope"]) == 2


def test_a_store_that_refuses_ops_drops_them_with_a_warning_and_never_stalls(tmp_path, empty_store, caplog):
    cfg = make_cfg(tmp_path / "run", empty_store)
    tracker = build_tracker(cfg, rank=0)
    tracker.start_stage("stage2")
    tracker.log_metrics({"loss/lm": 1.0}, step=0)
    assert tracker.flush(timeout=20)
    client = client_for(cfg)
    run = stage_runs(client, "maven-test")["stage2"]
    client.delete_run(run.info.run_id)  # someone deletes the run from the UI mid-stage
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(1, 200):
            tracker.log_metrics({"loss/lm": 1.0}, step=step)
            assert tracker.flush(timeout=20)  # refused, dropped: the queue drains, nothing waits
        tracker.end_stage("FINISHED")
        tracker.close()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 5 <= len(refusals) <= 7  # the first five in full, then one per hundred
    assert tracker.sender.dropped_ops >= 200
    assert not any((tmp_path / "run" / "mlflow_spool").glob("*.jsonl"))  # nothing retriable was left


# --------------------------------------------------------------------------- an unreachable store


def test_unreachable_store_buffers_without_blocking_then_spools_and_syncs(
    tmp_path, empty_store, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "offline-launch")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = make_cfg(
        tmp_path / "run", empty_store, uri=f"http://127.0.0.1:{closed_port()}", flush_timeout_s=5.0
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = build_tracker(cfg, rank=0)
        assert isinstance(tracker, MLflowTracker)
        tracker.start_stage("stage4", params={"p": 1})
        tracker.log_dict({"zero_optimization": {"stage": 3}}, "deepspeed_config.json")
        start = time.monotonic()
        for step in range(2000):
            tracker.log_metrics({"loss/lm": 10.0 - step * 1e-3, "perf/tokens_per_s": 1e4}, step=step)
        logging_time = time.monotonic() - start
        start = time.monotonic()
        tracker.end_stage("FINISHED")
        tracker.close()
        closing_time = time.monotonic() - start
    # Logging is queueing only; end_stage + close give up after one failed attempt, not after retries.
    assert logging_time < 2.0, logging_time
    assert closing_time < 10.0, closing_time
    assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1  # warned once

    (spool,) = (tmp_path / "run" / "mlflow_spool").glob("*.jsonl")
    uri, ops = read_spool(spool)
    assert uri == cfg.tracking.uri
    assert sum(op.num_metrics for op in ops) == 4000
    assert [op.kind for op in ops][0] == "open_stage" and ops[-1].kind == "end_stage"

    # The server never comes back: replay into a local SQLite store instead.
    target = tmp_path / "recovered.db"
    shutil.copyfile(empty_store, target)
    still_down = sync_spool(tmp_path / "run")  # to the store it was written for: still unreachable
    assert still_down.files == 0 and len(still_down.failed) == 1 and spool.exists()
    from maven_dist.train.tracking.__main__ import main as tracking_cli

    assert tracking_cli(["sync", str(tmp_path / "run"), "--uri", f"sqlite:///{target}"]) == 0
    assert "delivered 1 spool files" in capsys.readouterr().out
    assert not spool.exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{target}")
    run = stage_runs(client, "maven-test")["stage4"]
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss/lm")) == 2000
    assert run.data.params["p"] == "1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "deepspeed_config.json",
        "loss_curve.png",
    }


def test_next_tracker_replays_spool_for_its_store_first(tmp_path, empty_store, monkeypatch):
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "replayed")
    cfg = make_cfg(tmp_path / "run", empty_store)
    uri = resolve_tracking_uri(cfg)
    # A spool as an earlier stage process would have left it for this store (written offline).
    offline = make_cfg(
        tmp_path / "offline", empty_store, uri=f"http://127.0.0.1:{closed_port()}", flush_timeout_s=2.0
    )
    tracker = build_tracker(offline, rank=0)
    tracker.start_stage("stage1")
    for step in range(5):
        tracker.log_metrics({"loss/selector_bce": 1.0 - step / 10}, step=step)
    tracker.end_stage("FINISHED")
    tracker.close()
    (spilled,) = (tmp_path / "offline" / "mlflow_spool").glob("*.jsonl")
    _, ops = read_spool(spilled)
    spool = tmp_path / "run" / "mlflow_spool" / "earlier.jsonl"
    write_spool(spool, uri, ops)
    write_spool(tmp_path / "run" / "mlflow_spool" / "other-store.jsonl", "http://elsewhere:5000", ops)

    tracker = build_tracker(cfg, rank=0)  # the next stage's process
    tracker.start_stage("stage2")
    tracker.log_metrics({"loss/lm": 4.0}, step=0)
    tracker.end_stage("FINISHED")
    tracker.close()

    client = client_for(cfg)
    runs = stage_runs(client, "maven-test")
    assert sorted(runs) == ["<parent>", "stage1", "stage2"]
    assert len(client.get_metric_history(runs["stage1"].info.run_id, "loss/selector_bce")) == 5
    assert runs["stage1"].info.start_time < runs["stage2"].info.start_time  # replayed first
    assert not spool.exists()
    assert (tmp_path / "run" / "mlflow_spool" / "other-store.jsonl").exists()  # not ours: left alone


def test_buffer_is_bounded_and_keeps_the_newest_values(tmp_path, empty_store, monkeypatch, caplog):
    monkeypatch.setenv("MAVEN_LAUNCH_ID", "bounded")
    cfg = make_cfg(
        tmp_path / "run",
        empty_store,
        uri=f"http://127.0.0.1:{closed_port()}",
        max_buffered_metrics=1000,
        flush_timeout_s=2.0,
    )
    tracker = build_tracker(cfg, rank=0)
    tracker.start_stage("stage4")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(5000):
            tracker.log_metrics({"loss/lm": float(step)}, step=step)
    assert tracker.sender.buffered_metrics <= 1000
    assert "buffer is full" in caplog.text
    tracker.end_stage("FINISHED")
    tracker.close()
    (spool,) = (tmp_path / "run" / "mlflow_spool").glob("*.jsonl")
    _, ops = read_spool(spool)
    steps = [row[3] for op in ops if op.kind == "metrics" for row in op.payload["metrics"]]
    assert 900 <= len(steps) <= 1000
    assert steps == list(range(5000 - len(steps), 5000))


# --------------------------------------------------------------------------- system metrics


def test_system_metrics_sample_node_cpu_and_memory():
    from maven_dist.train.tracking.system_metrics import sample_system_metrics

    sample = sample_system_metrics()
    assert 0.0 <= sample["system/memory_percent"] <= 100.0
    assert 0.0 < sample["system/process_rss_gb"] < sample["system/memory_used_gb"] + 1.0
    assert sample["system/cpu_percent"] >= 0.0


@pytest.mark.gpu
def test_system_metrics_report_this_process_cuda_memory():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from maven_dist.train.tracking.system_metrics import sample_system_metrics

    block = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    sample = sample_system_metrics()
    assert sample["memory/gpu_allocated_gb"] >= 0.25
    assert sample["memory/gpu_max_allocated_gb"] >= sample["memory/gpu_allocated_gb"]
    del block


def test_the_cluster_tracking_server_applies_where_a_recipe_names_none(tmp_path, monkeypatch):
    from maven_dist.config import Config

    cfg = Config(run_dir=str(tmp_path))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MAVEN_TRACKING_URI", "http://mlflow.cluster:5000")
    assert resolve_tracking_uri(cfg) == "http://mlflow.cluster:5000"
    cfg.tracking.uri = "sqlite:///{run_dir}/own.db"
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/own.db", "the recipe's setting wins"
