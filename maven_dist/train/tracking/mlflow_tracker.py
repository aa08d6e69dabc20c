"""Rank 0's tracker: turns the trainer's calls into ops for the background :class:`.sender.Sender`."""

from __future__ import annotations

import atexit
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .base import RunStatus
from .ops import Op, read_spool, write_spool
from .run_info import (
    MAX_METRICS_PER_CALL,
    clip_key,
    clip_params,
    clip_tags,
    environment_tags,
    launch_run_name,
    launch_tags,
)
from .sender import Sender
from .system_metrics import SystemMetricsSampler

logger = logging.getLogger("maven_dist.train.tracking")

# MLflow accepts these characters in metric names; anything else would make the whole batch fail.
_BAD_METRIC_CHARS = re.compile(r"[^\w\-. :/]")
# Files up to this size are copied when logged, so a later change (or a replay from the spool after
# the trainer moved on) uploads what was logged; bigger ones are uploaded from where they are.
_COPY_ARTIFACT_MAX_BYTES = 64 * 1024**2


class MLflowTracker:
    """Tracks one process's stages in an MLflow store without ever blocking or failing training.

    Calls only queue ops; a daemon thread delivers them (see :mod:`.sender`). Undelivered ops are
    written to ``spool_dir`` at :meth:`close` and replayed first by the next tracker with the same
    store (or by ``maven sync RUN_DIR``).
    """

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        launch_id: str,
        spool_dir: str | Path,
        base_params: Mapping[str, Any] | None = None,
        resolved_config: Mapping[str, Any] | None = None,
        flush_interval_s: float = 5.0,
        flush_timeout_s: float = 30.0,
        max_buffered_metrics: int = 200_000,
        system_metrics_interval_s: float = 0.0,
        http_timeout_s: float = 10.0,
    ) -> None:
        # MLflow's HTTP client retries for minutes by default (7 retries, exponential backoff). The sender
        # retries on its own schedule instead, so each attempt should fail fast. setdefault: an operator's
        # explicit setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(http_timeout_s))))
        self.uri = uri
        self.experiment = experiment
        self.launch_id = launch_id
        self.spool_dir = Path(spool_dir)
        self.flush_timeout_s = flush_timeout_s
        self.system_metrics_interval_s = system_metrics_interval_s
        self._base_params = clip_params(base_params or {})
        self._resolved_config = dict(resolved_config) if resolved_config is not None else None
        self._stage: str | None = None
        self._last_step = 0
        self._warned: set[str] = set()
        self._closed = False
        self._sampler: SystemMetricsSampler | None = None
        self._replayed: list[Path] = []
        self._pid = os.getpid()
        self.sender = Sender(
            uri, max_buffered_metrics=max_buffered_metrics, flush_interval_s=flush_interval_s
        )
        self._replay_spool()
        self.sender.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ stage lifecycle

    def start_stage(
        self, stage_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> None:
        if self._stage is not None:
            self._warn_once(
                "restart", f"start_stage({stage_name!r}) while {self._stage!r} is open; ending it first"
            )
            self.end_stage("FINISHED")
        self._stage = stage_name
        all_params = {**self._base_params, **clip_params(params or {})}
        all_tags = clip_tags({**environment_tags(), **launch_tags(), **(tags or {})})
        parent_tags = {"maven.run_dir": str(self.spool_dir.parent), **launch_tags()}
        if launch_run_name():
            parent_tags["mlflow.runName"] = launch_run_name()
        if "mlflow.source.git.commit" in all_tags:
            parent_tags["mlflow.source.git.commit"] = all_tags["mlflow.source.git.commit"]
        self.sender.put(
            self._op(
                "open_stage",
                params=all_params,
                tags=all_tags,
                parent_tags=parent_tags,
                attempt_id=uuid.uuid4().hex,
                start_time_ms=_now_ms(),
            )
        )
        if self._resolved_config is not None:
            self.log_dict(self._resolved_config, "resolved_recipe.yaml")
        self._maybe_start_system_metrics()

    def end_stage(self, status: RunStatus = "FINISHED") -> None:
        if self._stage is None:
            self._warn_once("end_without_start", "end_stage() without an open stage; ignored")
            return
        try:
            if self._sampler is not None:
                self._sampler.stop()
                self._sampler = None
            self.sender.put(self._op("loss_curve", prefixes=["loss/"], name="loss_curve.png"))
            self.sender.put(self._op("end_stage", status=status, end_time_ms=_now_ms()))
        finally:
            self._stage = None
        self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        return self.sender.flush(self.flush_timeout_s if timeout is None else timeout)

    def close(self) -> None:
        # A forked child (a data worker) inherits this object but not the sender thread: only the
        # process that built the tracker may flush or spill its queue.
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._stage is not None:
            self._warn_once("close_open", f"close() with stage {self._stage!r} still open; marking it FAILED")
            self.end_stage("FAILED")
        if self._sampler is not None:
            self._sampler.stop()
        # end_stage already waited for the store; wait again only if it is reachable.
        self.flush(timeout=0 if self.sender.offline else None)
        leftover = self.sender.stop(timeout=2.0)
        if leftover:
            path = self.spool_dir / f"{self.launch_id}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
            write_spool(path, self.uri, leftover)
            n = sum(op.num_metrics for op in leftover)
            logger.warning(
                "MLflow tracking store %s was not reachable before exit; %d ops (%d metric values) saved to "
                "%s. The next stage replays them; or run: maven sync %s",
                self.uri,
                len(leftover),
                n,
                path,
                self.spool_dir.parent,
            )
        # Replayed spool files are either delivered or carried into the new spool file.
        for old in self._replayed:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ logging

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self._stage_open("log_metrics"):
            return
        try:
            ts = _now_ms()
            step = int(step)
            self._last_step = step
            rows = []
            for key, value in metrics.items():
                try:
                    v = float(value)
                except (TypeError, ValueError):
                    self._warn_once(f"nonnumeric:{key}", f"metric {key!r}={value!r} is not a number; skipped")
                    continue
                rows.append([_metric_key(key), v, ts, step])
            for i in range(0, len(rows), MAX_METRICS_PER_CALL):
                self.sender.put(self._op("metrics", metrics=rows[i : i + MAX_METRICS_PER_CALL]))
        except Exception as exc:  # the tracker must never take training down
            self._warn_once("log_metrics", f"log_metrics failed and was skipped: {exc!r}")

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._stage_open("log_params"):
            self._guarded(
                "log_params", lambda: self.sender.put(self._op("params", params=clip_params(params)))
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._stage_open("set_tags"):
            self._guarded("set_tags", lambda: self.sender.put(self._op("tags", tags=clip_tags(tags))))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._stage_open("log_artifact"):
            self._guarded("log_artifact", lambda: self._log_file(Path(path), artifact_path))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        def write(p: Path) -> None:
            if name.endswith((".yaml", ".yml")):
                p.write_text(yaml.safe_dump(_plain(data), sort_keys=False))
            else:
                p.write_text(json.dumps(_plain(data), indent=2, sort_keys=True))

        if self._stage_open("log_dict"):
            self._guarded("log_dict", lambda: self._log_staged(name, write))

    def log_text(self, text: str, name: str) -> None:
        if self._stage_open("log_text"):
            self._guarded("log_text", lambda: self._log_staged(name, lambda p: p.write_text(text)))

    # ------------------------------------------------------------------ internals

    def _op(self, kind: str, **payload: Any) -> Op:
        return Op(kind, self.experiment, self.launch_id, self._stage or "", payload)  # type: ignore[arg-type]

    def _log_file(self, path: Path, artifact_path: str | None) -> None:
        if not path.is_file():
            self._warn_once(f"missing:{path}", f"log_artifact: {path} is not a file; skipped")
            return
        if path.stat().st_size <= _COPY_ARTIFACT_MAX_BYTES:
            staged = self._staging_path(path.name)
            shutil.copyfile(path, staged)
            self.sender.put(
                self._op("artifact", path=str(staged), artifact_path=artifact_path, delete_after=True)
            )
        else:
            self.sender.put(self._op("artifact", path=str(path.resolve()), artifact_path=artifact_path))

    def _log_staged(self, name: str, write: Any) -> None:
        folder, _, filename = name.rpartition("/")
        staged = self._staging_path(filename)
        write(staged)
        self.sender.put(
            self._op("artifact", path=str(staged), artifact_path=folder or None, delete_after=True)
        )

    def _staging_path(self, filename: str) -> Path:
        folder = self.spool_dir / "staging" / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        return folder / filename

    def _replay_spool(self) -> None:
        """Queue ops spilled by earlier processes for this store ahead of this process's own."""
        if not self.spool_dir.is_dir():
            return
        ops: list[Op] = []
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            try:
                uri, spooled = read_spool(path)
            except (OSError, ValueError) as exc:
                logger.warning("skipping unreadable tracking spool %s: %s", path, exc)
                continue
            if uri != self.uri:
                logger.warning(
                    "tracking spool %s was written for %s, not %s; left in place (replay it with "
                    "maven sync %s --uri URI)",
                    path,
                    uri,
                    self.uri,
                    self.spool_dir.parent,
                )
                continue
            ops += spooled + [Op("spool_done", payload={"path": str(path)})]
            self._replayed.append(path)
        if ops:
            n = sum(op.num_metrics for op in ops)
            logger.info("replaying %d tracking ops (%d metric values) spooled by earlier runs", len(ops), n)
            self.sender.put_front(ops)

    def _maybe_start_system_metrics(self) -> None:
        if self.system_metrics_interval_s <= 0 or self._sampler is not None:
            return
        # Samples are stamped with the latest training step so they line up with the training curves.
        self._sampler = SystemMetricsSampler(
            self.system_metrics_interval_s, lambda sample: self.log_metrics(sample, self._last_step)
        )
        self._sampler.start()

    def _stage_open(self, what: str) -> bool:
        if self._stage is None:
            self._warn_once(f"nostage:{what}", f"{what}() before start_stage(); ignored")
            return False
        return True

    def _guarded(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # never let tracking take training down
            self._warn_once(what, f"{what} failed and was skipped: {exc!r}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("tracking: %s", message)


def _metric_key(key: str) -> str:
    clean = posixpath.normpath(_BAD_METRIC_CHARS.sub("_", str(key))).lstrip("/")
    return clip_key(clean or "_")


def _plain(data: Any) -> Any:
    """Make a mapping safe for yaml.safe_dump / json (tuples to lists, paths and others to strings)."""
    if isinstance(data, Mapping):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    if isinstance(data, (str, int, float, bool)) or data is None:
        return data
    return str(data)


def _now_ms() -> int:
    return int(time.time() * 1000)
