"""The background sender: delivers tracking ops to an MLflow store in order, surviving outages.

One daemon thread owns the :class:`mlflow.MlflowClient` (so training threads never wait on the
network) and works through a FIFO of :class:`~maven_dist.train.tracking.ops.Op`. An op leaves the
queue only after the store acknowledged it, so delivery is at-least-once and in order; ops are
idempotent (see :mod:`.ops`), so a redelivery after a timed-out-but-applied request is harmless.

Failure handling:

* **Transient** (connection refused or timed out, HTTP 5xx, a locked database): the store is marked
  offline, one warning is logged, and the sender retries with exponential backoff (1 s doubling to
  ``max_backoff_s``) while the queue keeps filling. :meth:`Sender.flush` forces an immediate retry.
  When a retry succeeds, one info line reports the outage length and how much was buffered.
* **Permanent** (the store answered and refused: a bad value, a deleted run): the op is dropped with a
  warning naming it, so one bad op cannot stall everything behind it. A transient-looking error that
  keeps coming back while the store answers a probe request counts as permanent after 3 tries.
* **Bounded buffer**: at most ``max_buffered_metrics`` metric values wait in memory; beyond that the
  oldest metric values are dropped (counted and reported). Other ops (a handful per stage) are kept.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .ops import Op
from .run_info import MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, clip_key, clip_tags, clip_value

logger = logging.getLogger("maven_dist.train.tracking")

# MLflow error codes that mean "try again later" (the store or the network, not the request).
TRANSIENT_ERROR_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
)
HEAD_OP_MAX_TRIES = 3
MAX_REFUSALS_LOGGED = 5
PARENT_KIND = "launch"
STAGE_KIND = "stage"


def is_transient(exc: BaseException) -> bool:
    """Whether a failed store call is worth retrying (network/store down) rather than dropping."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_ERROR_CODES
    return isinstance(exc, (OSError, TimeoutError))  # requests.RequestException is an OSError


class PermanentOpError(RuntimeError):
    """An op that can never be delivered (e.g. its run was never created); dropped with a warning."""


class Sender:
    """Delivers ops to the MLflow store at ``uri`` from a background thread (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        *,
        max_buffered_metrics: int = 200_000,
        flush_interval_s: float = 5.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.uri = uri
        self.max_buffered_metrics = max_buffered_metrics
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self._queue: deque[Op] = deque()
        self._cond = threading.Condition()
        self._buffered_metrics = 0
        self._inflight: set[int] = set()
        self._flush_requested = False
        self._stopping = False
        self._failures = 0  # delivery attempts that ended in a transient failure, ever
        self._consecutive_failures = 0
        self._head_tries = 0
        self._offline_since: float | None = None
        self._dropped_metrics = 0  # since the current outage began (buffer full)
        self.delivered_metrics = 0
        self.dropped_ops = 0
        self._permanent_failures = 0
        self._warned_full = False
        self._client: Any = None
        self._experiment_ids: dict[str, str] = {}
        self._run_ids: dict[tuple[str, str, str], str] = {}
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producer side (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, op: Op) -> None:
        """Queue an op; never blocks on the network. Drops the oldest metric values if the buffer is full."""
        with self._cond:
            self._queue.append(op)
            self._buffered_metrics += op.num_metrics
            if self._buffered_metrics > self.max_buffered_metrics:
                self._drop_oldest_metrics()
            if op.kind != "metrics" or self._buffered_metrics >= MAX_METRICS_PER_CALL:
                self._cond.notify_all()

    def put_front(self, ops: list[Op]) -> None:
        """Queue ops ahead of everything already queued (replayed spool files go first: they are older)."""
        with self._cond:
            self._queue.extendleft(reversed(ops))
            self._buffered_metrics += sum(op.num_metrics for op in ops)
            self._cond.notify_all()

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    @property
    def buffered_metrics(self) -> int:
        return self._buffered_metrics

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float) -> bool:
        """Ask for immediate delivery and wait until the queue is empty (True), or until a delivery attempt
        made after this call fails or ``timeout`` seconds pass (False: the ops stay queued)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            failures_before = self._failures
            self._flush_requested = True
            self._cond.notify_all()
            while self._queue and self._failures == failures_before:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    break
                self._cond.wait(min(left, 0.5))
            return not self._queue

    def stop(self, timeout: float = 5.0) -> list[Op]:
        """Stop the thread and return the ops that were not delivered (the caller spills them)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            return list(self._queue)

    # ------------------------------------------------------------------ consumer side (sender thread)

    def _loop(self) -> None:
        last_attempt = 0.0
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._offline_since is not None:
                        wait = min(self.max_backoff_s, 2.0 ** (self._consecutive_failures - 1))
                        due = self._queue and now - last_attempt >= wait
                    else:
                        urgent = any(op.kind != "metrics" for op in self._queue) or (
                            self._buffered_metrics >= MAX_METRICS_PER_CALL
                        )
                        wait = 0.0 if urgent else self.flush_interval_s
                        due = self._queue and now - last_attempt >= wait
                    if self._flush_requested and self._queue:
                        due = True
                    if due:
                        break
                    # Poll at the flush interval when idle: metric puts do not notify (only every 1000 values),
                    # so the first values after a quiet spell go out within one interval.
                    self._cond.wait(
                        max(0.05, wait - (now - last_attempt)) if self._queue else self.flush_interval_s
                    )
                if self._stopping:
                    return
                self._flush_requested = False
            last_attempt = time.monotonic()
            try:
                self.deliver_pending()
            except Exception:  # a bug here must not silently end tracking for the rest of the run
                logger.exception("MLflow sender: unexpected error; continuing")

    def deliver_pending(self) -> bool:
        """Deliver queued ops in order until the queue is empty (True) or the store is unreachable (False)."""
        while True:
            with self._cond:
                if not self._queue or (self._stopping and threading.current_thread() is self._thread):
                    return not self._queue
                batch = self._take_head_batch()
                self._inflight = {id(op) for op in batch}
            try:
                self._deliver(batch)
            except Exception as exc:
                if is_transient(exc) and not self._head_op_is_stuck(exc):
                    self._on_transient_failure(exc)
                    return False
                self._on_permanent_failure(batch, exc)
            else:
                self._on_success(batch)

    def _take_head_batch(self) -> list[Op]:
        head = self._queue[0]
        if head.kind != "metrics":
            return [head]
        batch, n = [], 0
        for op in self._queue:
            same_run = (op.experiment, op.launch_id, op.stage) == (
                head.experiment,
                head.launch_id,
                head.stage,
            )
            if op.kind != "metrics" or not same_run or n + op.num_metrics > MAX_METRICS_PER_CALL:
                break
            batch.append(op)
            n += op.num_metrics
        return batch or [head]

    def _remove(self, batch: list[Op]) -> None:
        ids = {id(op) for op in batch}
        with self._cond:
            # Buffer overflow may have dropped some of these already; remove what is still there.
            while self._queue and id(self._queue[0]) in ids:
                op = self._queue.popleft()
                self._buffered_metrics -= op.num_metrics
            self._inflight = set()
            self._head_tries = 0
            self._cond.notify_all()

    def _on_success(self, batch: list[Op]) -> None:
        delivered = sum(op.num_metrics for op in batch)
        self.delivered_metrics += delivered
        if self._offline_since is not None:
            outage = time.monotonic() - self._offline_since
            logger.info(
                "MLflow tracking store %s is reachable again after %.0f s; flushing %d buffered metric "
                "values (%d ops)%s",
                self.uri,
                outage,
                self._buffered_metrics,
                len(self._queue),
                f", {self._dropped_metrics} older values were dropped (buffer full)"
                if self._dropped_metrics
                else "",
            )
            self._offline_since = None
            self._dropped_metrics = 0
            self._warned_full = False
        self._consecutive_failures = 0
        self._remove(batch)

    def _on_transient_failure(self, exc: BaseException) -> None:
        with self._cond:
            self._inflight = set()
            self._failures += 1
            self._consecutive_failures += 1
            if self._offline_since is None:
                self._offline_since = time.monotonic()
                logger.warning(
                    "MLflow tracking store %s is unreachable (%s); training continues, metrics are buffered "
                    "in memory (up to %d values, oldest dropped beyond) and retried every <= %.0f s",
                    self.uri,
                    _short(exc),
                    self.max_buffered_metrics,
                    self.max_backoff_s,
                )
            self._cond.notify_all()

    def _on_permanent_failure(self, batch: list[Op], exc: BaseException) -> None:
        self.dropped_ops += len(batch)
        self._permanent_failures += 1
        op = batch[0]
        # The first few refusals are logged in full; after that one line per hundred, so a store that
        # refuses everything (a deleted experiment, a wrong URI) cannot flood the training log.
        if self._permanent_failures <= MAX_REFUSALS_LOGGED or self._permanent_failures % 100 == 0:
            logger.warning(
                "MLflow store %s refused a %r op for launch %s stage %s; dropping it (%d ops, %d refusals "
                "so far): %s",
                self.uri,
                op.kind,
                op.launch_id,
                op.stage or "-",
                len(batch),
                self._permanent_failures,
                _short(exc),
            )
        self._remove(batch)

    def _head_op_is_stuck(self, exc: BaseException) -> bool:
        """A 'transient' error while the store answers a probe is about this op; give up after a few tries."""
        try:
            self._get_client().search_experiments(max_results=1)
        except Exception:
            return False  # the store itself is down: a real outage
        self._head_tries += 1
        return self._head_tries >= HEAD_OP_MAX_TRIES

    def _drop_oldest_metrics(self) -> None:
        # Drop in chunks (a tenth of the buffer) so a long outage costs O(1) amortised per put.
        target = int(self.max_buffered_metrics * 0.9)
        kept: deque[Op] = deque()
        for op in self._queue:
            if op.kind == "metrics" and self._buffered_metrics > target and id(op) not in self._inflight:
                self._buffered_metrics -= op.num_metrics
                self._dropped_metrics += op.num_metrics
                continue
            kept.append(op)
        if self._dropped_metrics and not self._warned_full:
            self._warned_full = True
            logger.warning(
                "MLflow tracking buffer is full (%d metric values); dropping the oldest values until the "
                "store %s is reachable",
                self.max_buffered_metrics,
                self.uri,
            )
        self._queue = kept

    # ------------------------------------------------------------------ delivery of one batch

    def _get_client(self) -> Any:
        if self._client is None:
            from maven_dist.train.tracking.client import mlflow_client

            self._client = mlflow_client(self.uri)
        return self._client

    def _deliver(self, batch: list[Op]) -> None:
        op = batch[0]
        handler = getattr(self, f"_do_{op.kind}")
        if op.kind == "metrics":
            handler(batch)
        else:
            handler(op)

    def _do_metrics(self, batch: list[Op]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for op in batch for k, v, ts, step in op.payload["metrics"]]
        self._get_client().log_batch(self._run_id(batch[0]), metrics=metrics, synchronous=True)

    def _do_params(self, op: Op) -> None:
        self._log_params(self._run_id(op), op.payload["params"])

    def _do_tags(self, op: Op) -> None:
        self._set_tags(self._run_id(op), op.payload["tags"])

    def _do_artifact(self, op: Op) -> None:
        path = Path(op.payload["path"])
        if not path.exists():
            raise PermanentOpError(f"artifact {path} no longer exists")
        self._get_client().log_artifact(self._run_id(op), str(path), op.payload.get("artifact_path"))
        if op.payload.get("delete_after"):
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # its private staging folder, now empty

    def _do_spool_done(self, op: Op) -> None:
        Path(op.payload["path"]).unlink(missing_ok=True)

    def _do_open_stage(self, op: Op) -> None:
        from mlflow.entities import RunStatus

        client = self._get_client()
        payload = op.payload
        exp_id = self._experiment_id(op.experiment)
        start_ms = payload["start_time_ms"]

        parent = self._find_run(exp_id, op.launch_id, "")
        if parent is None:
            tags = {
                "maven.launch_id": op.launch_id,
                "maven.run_kind": PARENT_KIND,
                "mlflow.runName": op.launch_id,
                **payload.get("parent_tags", {}),
            }
            parent = client.create_run(
                exp_id, start_time=start_ms, tags=clip_tags(tags), run_name=tags["mlflow.runName"]
            )
        elif parent.info.status != RunStatus.to_string(RunStatus.RUNNING):
            client.update_run(parent.info.run_id, status="RUNNING")
        parent_id = parent.info.run_id
        self._run_ids[(op.experiment, op.launch_id, "")] = parent_id

        tags = dict(payload.get("tags", {}))
        run = self._find_run(exp_id, op.launch_id, op.stage)
        if run is None:
            tags.setdefault("maven.resume_count", "0")
            tags.update(
                {
                    "maven.launch_id": op.launch_id,
                    "maven.stage": op.stage,
                    "maven.run_kind": STAGE_KIND,
                    "maven.attempt_id": payload["attempt_id"],
                    "mlflow.parentRunId": parent_id,
                    "mlflow.runName": op.stage,
                }
            )
            run = client.create_run(exp_id, start_time=start_ms, tags=clip_tags(tags), run_name=op.stage)
            run_id = run.info.run_id
        else:
            # A resumed stage reopens its run. The attempt id makes a redelivered open_stage (sent, then
            # replayed from a spool) count as one resume, not two.
            run_id = run.info.run_id
            if run.data.tags.get("maven.attempt_id") != payload["attempt_id"]:
                previous = int(run.data.tags.get("maven.resume_count", "0") or 0)
                tags.setdefault("maven.resume_count", str(previous + 1))
                tags["maven.attempt_id"] = payload["attempt_id"]
            if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                client.update_run(run_id, status="RUNNING")
            self._set_tags(run_id, tags)
        self._run_ids[(op.experiment, op.launch_id, op.stage)] = run_id
        self._log_params(run_id, payload.get("params", {}))

    def _do_end_stage(self, op: Op) -> None:
        client = self._get_client()
        status, end_ms = op.payload["status"], op.payload["end_time_ms"]
        client.set_terminated(self._run_id(op), status=status, end_time=end_ms)
        # The parent mirrors its latest stage: RUNNING while one runs, then that stage's end status;
        # the next stage of the launch reopens it.
        parent_op = Op("end_stage", op.experiment, op.launch_id, "")
        client.set_terminated(self._run_id(parent_op), status=status, end_time=end_ms)

    def _do_loss_curve(self, op: Op) -> None:
        from .loss_curve import render_loss_curve

        client = self._get_client()
        run_id = self._run_id(op)
        prefixes = tuple(op.payload.get("prefixes", ["loss/"]))
        keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(prefixes))
        if not keys:
            return
        # Drawn from the store, not from this process's memory: a resumed stage's curve then includes
        # the steps logged before the resume.
        series = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / op.payload.get("name", "loss_curve.png")
            render_loss_curve(series, path, title=f"{op.launch_id} / {op.stage}")
            client.log_artifact(run_id, str(path), op.payload.get("artifact_path"))

    # ------------------------------------------------------------------ helpers

    def _experiment_id(self, name: str) -> str:
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        from mlflow.exceptions import MlflowException

        client = self._get_client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=default_artifact_location(self.uri))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(name).experiment_id  # another launch created it
        elif exp.lifecycle_stage == "deleted":
            raise PermanentOpError(
                f"experiment {name!r} is deleted in {self.uri}; restore it (mlflow experiments restore) "
                "or set tracking.experiment to another name"
            )
        else:
            exp_id = exp.experiment_id
        self._experiment_ids[name] = exp_id
        return exp_id

    def _find_run(self, exp_id: str, launch_id: str, stage: str) -> Any:
        kind = STAGE_KIND if stage else PARENT_KIND
        query = f"tags.`maven.launch_id` = '{launch_id}' AND tags.`maven.run_kind` = '{kind}'"
        if stage:
            query += f" AND tags.`maven.stage` = '{stage}'"
        runs = self._get_client().search_runs(
            [exp_id], filter_string=query, max_results=1, order_by=["start_time ASC"]
        )
        return runs[0] if runs else None

    def _run_id(self, op: Op) -> str:
        key = (op.experiment, op.launch_id, op.stage)
        if key not in self._run_ids:
            exp_id = self._experiment_id(op.experiment)
            run = self._find_run(exp_id, op.launch_id, op.stage)
            if run is None:
                raise PermanentOpError(
                    f"no run for launch {op.launch_id!r} stage {op.stage!r} in experiment {op.experiment!r}"
                )
            self._run_ids[key] = run.info.run_id
        return self._run_ids[key]

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = list(clip_tags(tags).items())
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            chunk = [RunTag(k, v) for k, v in items[i : i + MAX_PARAMS_PER_CALL]]
            self._get_client().log_batch(run_id, tags=chunk, synchronous=True)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Log params 100 per call; a param that already has another value is kept, and the change is
        recorded as a ``maven.param_changed.<key>`` tag (MLflow params are immutable)."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = self._get_client()
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            chunk = dict(items[i : i + MAX_PARAMS_PER_CALL])
            try:
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk.items()], synchronous=True)
                continue
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
            existing = client.get_run(run_id).data.params
            new = {k: v for k, v in chunk.items() if k not in existing}
            changed = {k: v for k, v in chunk.items() if k in existing and existing[k] != v}
            if new:
                client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()], synchronous=True)
            if changed:
                logger.warning(
                    "run %s already has other values for params %s (MLflow params are immutable); keeping "
                    "the first values and recording the new ones as maven.param_changed.* tags",
                    run_id,
                    sorted(changed),
                )
                self._set_tags(
                    run_id,
                    {
                        clip_key(f"maven.param_changed.{k}"): clip_value(f"{existing[k]} -> {v}", 8000)
                        for k, v in changed.items()
                    },
                )


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite store (``<db dir>/mlartifacts``), since
    MLflow's default for SQL stores is ``./mlruns`` under whatever the current directory happens to be;
    None (the server's choice) for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent.resolve() / "mlartifacts").as_uri()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."
