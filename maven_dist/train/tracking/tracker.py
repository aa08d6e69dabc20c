"""The tracker the trainer codes against: :class:`Tracker` does nothing (every rank but 0);
:class:`MLflowTracker` (rank 0) writes the run's record, then syncs it (:mod:`.sync`). No thread: every call
does its work before it returns, so a process that forks (rank 0 does, for its DataLoader workers) has none
to fork under. When it syncs, and its back-off while the store fails: docs/experiments.md."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from maven_dist.config import TrackingConfig
from maven_dist.train.metrics_file import append_metrics

from .run_info import RUN_NAME_ENV, clip_key, environment_tags, launch_tags
from .sync import RunRecord, find_records, is_synced, sync_record

logger = logging.getLogger("maven_dist.train.tracking")
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
MAX_BACKOFF_S = 120.0
_BAD_METRIC_CHARS = re.compile(r"[^\w\-. :/]")  # anything else makes MLflow refuse the whole batch


class Tracker:
    """Experiment tracking as the trainer sees it; this one does nothing. No method raises because of the
    store. ``start_stage`` opens (on resume: reopens) the stage's run under the launch's parent run,
    ``log_dict`` attaches YAML (``.yaml``/``.yml`` names) or JSON, ``end_stage`` closes the run."""

    def start_stage(
        self, stage_name: str, params: Mapping | None = None, tags: Mapping | None = None
    ) -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: Mapping[str, Any], name: str) -> None: ...
    def end_stage(self, status: RunStatus = "FINISHED") -> None: ...
    def close(self) -> None: ...


NullTracker = Tracker


class MLflowTracker(Tracker):
    """Records a process's stage runs in ``record_dir`` (default ``run_dir/<stage>``) and syncs them to the
    store at ``uri`` (None: record only), after the records under ``run_dir`` the store lacks (earlier ones).
    ``cfg``'s intervals and timeout apply (default: no system metrics, for an evaluation logs once)."""

    def __init__(self, *, uri: str | None, experiment: str, launch_id: str, run_dir: str | Path,
                 record_dir: str | Path | None = None, cfg: TrackingConfig | None = None,
                 base_params: Mapping | None = None, resolved_config: Mapping | None = None) -> None:  # fmt: skip
        self.cfg = cfg or TrackingConfig(system_metrics_interval_s=0.0)
        if uri:  # MLflow's HTTP client retries for minutes; this tracker retries on its own schedule
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(self.cfg.http_timeout_s))))
        self.uri, self.run_dir, self.record_dir = uri, Path(run_dir), record_dir
        self.identity = {"experiment": experiment, "launch_id": launch_id}
        self.base_params, self.resolved_config = dict(base_params or {}), resolved_config
        self.record: RunRecord | None = None
        self.pending: list[RunRecord] = []  # earlier runs' records the store lacks
        self._open, self._warned, self._next_sync, self._next_sample = False, set(), 0.0, 0.0
        self._down_since: float | None = None  # when the store last began to fail

    def start_stage(
        self, stage_name: str, params: Mapping | None = None, tags: Mapping | None = None
    ) -> None:
        if self._open:
            self._warn(f"start_stage({stage_name!r}) while a stage is open; ending it first")
            self.end_stage("FINISHED")
        parent_tags = {"maven.run_dir": str(self.run_dir), **launch_tags()}
        if name := os.environ.get(RUN_NAME_ENV, "").strip():
            parent_tags["mlflow.runName"] = name
        self.record, self._open = RunRecord(self.record_dir or self.run_dir / stage_name), True
        self.record.open_attempt(self.uri, self.identity | {"stage": stage_name}, parent_tags,
                                 self.base_params | dict(params or {}),
                                 environment_tags() | launch_tags() | dict(tags or {}))  # fmt: skip
        if self.resolved_config is not None:
            self.log_dict(self.resolved_config, "resolved_recipe.yaml")
        if self.cfg.system_metrics_interval_s > 0:
            sample_system_metrics()  # psutil's first cpu_percent(None) is a meaningless 0.0: prime it
        if self.uri:
            others = [r for r in find_records(self.run_dir) if r.dir != self.record.dir]
            self.pending = [r for r in others if r.data.get("uri") == self.uri and not is_synced(r, self.uri)]
            if self.pending:
                logger.info("tracking: sending %d earlier runs' records to %s", len(self.pending), self.uri)
        self.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self._stage_open("log_metrics"):
            return
        values = {}
        for key, value in metrics.items():
            name = clip_key(posixpath.normpath(_BAD_METRIC_CHARS.sub("_", key)).lstrip("/"))
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                self._warn(f"metric {key!r}={value!r} is not a number; skipped")
        if self.cfg.system_metrics_interval_s > 0 and time.monotonic() >= self._next_sample:
            values |= sample_system_metrics()
            self._next_sample = time.monotonic() + self.cfg.system_metrics_interval_s
        append_metrics(self.record.metrics, int(step), values)
        if time.monotonic() >= self._next_sync:
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy ``path`` into the record now: what is sent later is the file as it was logged."""
        if not self._stage_open("log_artifact"):
            return
        if Path(path).is_file():
            shutil.copyfile(path, self._artifact(f"{artifact_path or '.'}/{Path(path).name}"))
        else:
            self._warn(f"log_artifact: {path} is not a file; skipped")

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        if self._stage_open("log_dict"):
            plain = json.loads(json.dumps(data, default=str))  # tuples to lists, paths and others to strings
            yaml_name = name.endswith((".yaml", ".yml"))
            text = yaml.safe_dump(plain, sort_keys=False) if yaml_name else json.dumps(plain)
            self._artifact(name).write_text(text)

    def end_stage(self, status: RunStatus = "FINISHED") -> None:
        if not self._stage_open("end_stage"):
            return
        self._open = False
        self.record.end_attempt(status)
        if not self.flush():
            logger.warning("tracking: the store lacks %s for now; the next stage sends it, or: maven sync %s",
                           self.record.dir, self.run_dir)  # fmt: skip

    def flush(self) -> bool:
        """Send the earlier runs' records, then this one; True when the store has them all."""
        if not self.uri or self.record is None:
            return True
        now = time.monotonic()
        try:
            for record in [*self.pending, self.record]:  # sending one again is cheap and harmless
                sync_record(record, self.uri)
        except Exception as exc:  # noqa: BLE001 - whatever the store does, training goes on
            if self._down_since is None:
                self._down_since = now
                logger.warning("MLflow tracking store %s is unreachable or refused a call (%s); training goes on "
                               "and keeps everything in %s, sent when the store answers (tried again within "
                               "%.0f s) or by: maven sync %s", self.uri, f"{type(exc).__name__}: {exc}"[:300],
                               self.record.dir, MAX_BACKOFF_S, self.run_dir)  # fmt: skip
            pause = max(self.cfg.flush_interval_s, now - self._down_since)  # the outage so far: pauses double
            self._next_sync = time.monotonic() + min(pause, MAX_BACKOFF_S)
            return False
        self.pending = []
        if self._down_since is not None:
            logger.info("MLflow tracking store %s is reachable again after %.0f s; the record is sent",
                        self.uri, now - self._down_since)  # fmt: skip
        self._down_since, self._next_sync = None, time.monotonic() + self.cfg.flush_interval_s
        return True

    def close(self) -> None:
        if self._open:
            self._warn("close() with a stage still open; marking it FAILED")
            self.end_stage("FAILED")

    def _artifact(self, name: str) -> Path:
        (path := self.record.artifacts / name).parent.mkdir(parents=True, exist_ok=True)
        return path

    def _stage_open(self, what: str) -> bool:
        if not self._open:
            self._warn(f"{what}() before start_stage(); ignored")
        return self._open

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("tracking: %s", message)


def sample_system_metrics() -> dict[str, float]:
    """``system/*``: the node's CPU and memory, this process's RSS (the trainer's perf meter logs the GPU's)."""
    import psutil

    vm, gb = psutil.virtual_memory(), 1024**3
    return {"system/cpu_percent": psutil.cpu_percent(interval=None), "system/memory_percent": vm.percent,
            "system/memory_used_gb": (vm.total - vm.available) / gb,
            "system/process_rss_gb": psutil.Process().memory_info().rss / gb}  # fmt: skip
