"""A run's durable record on rank 0's disk (everything MLflow is told, on disk before it is told), and its
idempotent sync to an MLflow store, which the tracker, the next stage and ``maven sync`` run as often as they
must. The files, and how nothing arrives twice: docs/experiments.md, "How a run reaches MLflow"."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maven_dist.contract.atomic_write import write_json_atomic
from maven_dist.train.metrics_file import drop_torn_line, iter_lines

from .client import mlflow_client, sqlite_path
from .run_info import PARAM_LIMIT, TAG_LIMIT, clip

PARENT_KIND, STAGE_KIND = "launch", "stage"
REFUSED = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE")


class RunRecord:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.metrics, self.artifacts = self.dir / "metrics.jsonl", self.dir / "tracking/artifacts"
        self.run_file, self.synced_file = self.dir / "tracking/run.json", self.dir / "tracking/synced.json"
        self.data: dict[str, Any] = json.loads(self.run_file.read_text()) if self.run_file.is_file() else {}

    def open_attempt(self, uri: str | None, identity: dict[str, str], parent_tags: Mapping[str, str],
                     params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:  # fmt: skip
        """A new attempt of the run ``identity`` (experiment, launch_id, stage) names: the same run again if
        the record is of it (a resumed stage), else a fresh record that skips an older launch's lines of
        ``metrics.jsonl`` (``metrics_from``). A param keeps its first value; a change is a tag."""
        drop_torn_line(self.metrics)
        if any(self.data.get(k) != v for k, v in identity.items()):
            shutil.rmtree(self.dir / "tracking", ignore_errors=True)
            start = self.metrics.stat().st_size if self.metrics.is_file() else 0
            self.data = identity | {"params": {}, "tags": {}, "attempts": [], "metrics_from": start}
            self.data["parent_tags"] = clip(parent_tags, TAG_LIMIT)
        old, new = self.data["params"], clip(params, PARAM_LIMIT)
        changed = {
            f"maven.param_changed.{k}": f"{old[k]} -> {v}" for k, v in new.items() if old.get(k, v) != v
        }
        self.data["uri"], self.data["params"] = uri, new | old
        self.data["tags"] |= clip({**tags, **changed}, TAG_LIMIT)
        self.data["attempts"].append(
            {"start_ms": int(time.time() * 1000), "end_ms": None, "status": "RUNNING"}
        )
        self.save()

    def end_attempt(self, status: str) -> None:
        self.data["attempts"][-1] |= {"end_ms": int(time.time() * 1000), "status": status}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.run_file, self.data)

    def synced(self) -> dict:
        """Per store: the run ids, how far ``metrics.jsonl`` was sent, the :meth:`digest` of the rest."""
        return json.loads(self.synced_file.read_text()) if self.synced_file.is_file() else {}

    def digest(self) -> str:
        """What :func:`_send_run_state` sends, in short: ``run.json`` and the artifacts' names, sizes, times."""
        files = sorted(self.artifacts.rglob("*")) if self.artifacts.is_dir() else []
        listing = [
            (str(p.relative_to(self.artifacts)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
        ]
        return hashlib.sha256(json.dumps([self.data, listing], sort_keys=True).encode()).hexdigest()


def find_records(root: str | Path) -> list[RunRecord]:
    """Every record in ``root`` or up to three levels under it (a stage, an evaluation in ``eval/<model>``, a
    sweep's ``<arm>/<stage>``), in the order they began; a run directory's data is not walked."""
    patterns = ["*/" * depth + "tracking/run.json" for depth in range(4)]
    records = [RunRecord(p.parent.parent) for pattern in patterns for p in Path(root).glob(pattern)]
    return sorted(records, key=lambda r: r.data["attempts"][0]["start_ms"])


def sync_record(record: RunRecord, uri: str | None = None) -> int:
    """Bring the store at ``uri`` (default: the record's) up to date with ``record``; the number of metric
    values sent. Raises what the store raises (unreachable, refused); the record stays as it is."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    uri = uri or record.data.get("uri")
    if not uri:
        raise ValueError(f"the record in {record.dir} names no tracking store; give one (--uri)")
    client, synced, sent = mlflow_client(uri), record.synced(), 0
    state = synced.setdefault(uri, {})
    try:
        if "run_id" not in state:
            state |= _open_runs(client, record.data, uri)
        lines = iter_lines(record.metrics, state["offset"])
        while chunk := list(itertools.islice(lines, 100)):  # a chunk the store acknowledged is not sent again
            batch = [Metric(k, float(v), row["time_ms"], row["step"])
                     for row, _ in chunk for k, v in row.items() if k not in ("step", "time_ms")]  # fmt: skip
            # synchronous: never a thread; MLflow splits the batch to the store's limits
            client.log_batch(state["run_id"], metrics=batch, synchronous=True)
            state["offset"], sent = chunk[-1][1], sent + len(batch)
            write_json_atomic(record.synced_file, synced)
        if state.get("digest") != (digest := record.digest()):
            _send_run_state(client, record, state)
            state["digest"] = digest
            write_json_atomic(record.synced_file, synced)
    except MlflowException as exc:
        if exc.error_code in REFUSED:  # the run is gone (deleted in the UI?): find or make it anew next time
            synced.pop(uri)
            write_json_atomic(record.synced_file, synced)
        raise
    return sent


def is_synced(record: RunRecord, uri: str) -> bool:
    """Whether the store at ``uri`` has all of ``record`` (from ``synced.json``: no call to the store)."""
    state = record.synced().get(uri, {})
    size = record.metrics.stat().st_size if record.metrics.is_file() else 0
    return state.get("digest") == record.digest() and state.get("offset", -1) >= size


def sync_run_dir(root: str | Path, uri: str | None = None) -> tuple[int, int, list[str]]:
    """:func:`sync_record` for every record under ``root``: (records synced, metric values, failures)."""
    done, values, failed = 0, 0, []
    for record in find_records(root):
        try:
            values, done = values + sync_record(record, uri), done + 1
        except Exception as exc:  # noqa: BLE001 - one record the store refuses must not keep back the others
            failed.append(f"{record.dir}: {type(exc).__name__}: {str(exc)[:300]}")
    return done, values, failed


def _open_runs(client: Any, data: dict, uri: str) -> dict:
    """Find (or create) the launch's parent run and the stage's run; metrics go from ``metrics_from`` on."""
    name, launch, stage = data["experiment"], data["launch_id"], data["stage"]
    if (experiment := client.get_experiment_by_name(name)) is None:
        path = sqlite_path(uri)  # artifacts beside a SQLite store, not in ./mlruns of whatever the cwd is
        exp_id = client.create_experiment(name, path and (path.parent.resolve() / "mlartifacts").as_uri())
    elif experiment.lifecycle_stage == "deleted":
        raise ValueError(f"experiment {name!r} is deleted in {uri}; restore it or set tracking.experiment")
    else:
        exp_id = experiment.experiment_id
    start, launch_tag = data["attempts"][0]["start_ms"], {"maven.launch_id": launch}
    parent_tags = {"mlflow.runName": launch} | data["parent_tags"]
    parent = _find_or_create(client, exp_id, start, launch_tag | {"maven.run_kind": PARENT_KIND}, parent_tags)
    stage_tag = launch_tag | {"maven.run_kind": STAGE_KIND, "maven.stage": stage}
    run = _find_or_create(
        client, exp_id, start, stage_tag, {"mlflow.parentRunId": parent, "mlflow.runName": stage}
    )
    return {"parent_id": parent, "run_id": run, "offset": data["metrics_from"]}


def _find_or_create(client: Any, exp_id: str, start_ms: int, keys: dict, more: dict) -> str:
    """The first run that carries the tags ``keys``, else a new one with ``keys`` and ``more``."""
    query = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in keys.items())
    if found := client.search_runs([exp_id], query, max_results=1, order_by=["start_time ASC"]):
        return found[0].info.run_id
    return client.create_run(exp_id, start_ms, keys | more, run_name=more["mlflow.runName"]).info.run_id


def _send_run_state(client: Any, record: RunRecord, state: dict) -> None:
    """Params not in the run yet, tags, artifacts, and the status of the run and its parent."""
    from mlflow.entities import Param, RunTag

    data, run_id = record.data, state["run_id"]
    logged = client.get_run(run_id).data.params
    tags = data["tags"] | {"maven.resume_count": str(len(data["attempts"]) - 1)}
    client.log_batch(run_id, params=[Param(k, v) for k, v in data["params"].items() if k not in logged],
                     tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)  # fmt: skip
    if record.artifacts.is_dir():
        client.log_artifacts(run_id, str(record.artifacts))
    last = data["attempts"][-1]
    for run in (run_id, state["parent_id"]):  # the parent follows its latest stage
        if last["end_ms"] is None:
            client.update_run(run, status="RUNNING")
        else:
            client.set_terminated(run, status=last["status"], end_time=last["end_ms"])
