"""MLflow experiment tracking for maven_dist: rank 0 only, outage-proof, one parent run per launch.

Layout in the store
-------------------
* **Experiment** = ``tracking.experiment`` (one per recipe family, e.g. ``maven-7b``; ablations may use
  their own). Created on first use; with a SQLite store its artifacts live beside the database
  (``<db dir>/mlartifacts``), never in the current directory.
* **Parent run** = one *launch* of a recipe: all four stages of one pipeline run. Stages run as separate
  processes (one after another, possibly as separate Slurm jobs), so they find their parent by tag
  ``maven.launch_id`` (+ ``maven.run_kind=launch``) instead of passing a run id around. The launch id is
  ``$MAVEN_LAUNCH_ID`` if set (a pipeline or sbatch script can set one for all its stages), else the
  contents of ``{run_dir}/launch_id``, written by the first stage that starts in that run directory.
  Same run directory = same launch: re-running or resuming there continues the same parent run; a new
  run directory (or a new ``MAVEN_LAUNCH_ID``) starts a new one. The parent's status follows its latest
  stage (RUNNING while one runs, then that stage's end status).
* **Nested stage run** per stage (``mlflow.parentRunId`` = the parent), found by tags ``maven.launch_id``
  + ``maven.stage``, so a resumed stage (requeued Slurm job, restart after a crash) reopens the *same*
  run and continues its metric curves; ``maven.resume_count`` counts the reopenings. It carries
  params (the flattened resolved config, ``parallel.world_size``/``parallel.dp``, ``env.git_sha``,
  ``env.version.*``, plus whatever the trainer passes; at most 100 per call, values cut to MLflow's
  6000 characters), tags (Slurm job id, node list, restart count, host, git commit), metrics (the
  trainer's ``loss/*``, ``perf/*``, ``memory/*``, ... and ``system/*`` from psutil every
  ``tracking.system_metrics_interval_s``), and artifacts (``resolved_recipe.yaml`` automatically, the
  trainer's DeepSpeed config and other files, and ``loss_curve.png`` drawn at :meth:`end_stage` from
  the stored ``loss/*`` history, so a resumed stage's curve is whole).

Never stopping training
-----------------------
Only rank 0 talks to MLflow (:func:`build_tracker` gives every other rank a :class:`NullTracker`). The
trainer's calls only queue ops; a daemon thread (:mod:`.sender`) sends them in order, metrics batched up
to 1000 per ``log_batch`` every ``tracking.flush_interval_s``. MLflow's own HTTP retries are turned off
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=tracking.http_timeout_s``, unless
already set) because the sender retries itself, and MLflow's usage telemetry is off (``maven_dist/__init__.py``
says why). When the store is unreachable the sender warns once, keeps up to
``tracking.max_buffered_metrics`` metric values in memory (the oldest are dropped beyond that, and
counted), retries with backoff up to 30 s, and when the store answers again flushes everything and logs
the outage length and how much it buffered. :meth:`~MLflowTracker.end_stage` and
:meth:`~MLflowTracker.close` wait at most ``tracking.flush_timeout_s``; whatever is still undelivered at
``close`` is written to ``{run_dir}/mlflow_spool/*.jsonl`` and replayed by the next tracker that opens
the same store (the next stage), or by hand::

    maven sync RUN_DIR [--uri URI]   # --uri: replay into another store

The SQLite default suits one machine (laptop, CI, one node); on a cluster whose run directory sits on
NFS/Lustre point ``tracking.uri`` at a tracking server instead (SQLite locking is unreliable there).
A process killed with SIGKILL loses what it had not sent yet (at most ``flush_interval_s`` of metrics
while the store is up); trainers should call ``end_stage("FAILED"/"KILLED")`` and ``close()`` on errors
and on preemption signals (``close`` also runs at interpreter exit).

Comparing runs: ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`` or
``python tools/compare_runs.py --run-dir RUN_DIR`` (see :mod:`.compare`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .base import NullTracker, RunStatus, Tracker
from .mlflow_tracker import MLflowTracker
from .run_info import environment_params, flatten_params, resolve_launch_id

if TYPE_CHECKING:
    from maven_dist.config import Config

__all__ = [
    "MLflowTracker",
    "NullTracker",
    "RunStatus",
    "Tracker",
    "build_tracker",
    "TRACKING_URI_ENV",
    "resolve_tracking_uri",
    "stage_params",
]


TRACKING_URI_ENV = "MAVEN_TRACKING_URI"
"""A cluster's shared tracking server for every job (slurm/env.sh; slurm/mlflow_server.sh starts one)."""


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``$MAVEN_TRACKING_URI``, else a SQLite store at ``{run_dir}/mlflow.db``
    (absolute, so any cwd works)."""
    uri = cfg.tracking.uri or os.environ.get(TRACKING_URI_ENV, "").strip()
    if uri:
        return uri.replace("{run_dir}", str(Path(cfg.run_dir).resolve()))
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def stage_params(cfg: Config, world_size: int) -> dict[str, str]:
    """Params every stage run gets: the flattened resolved config, the parallel layout, code and package
    versions. The trainer's own ``params`` are logged on top of these."""
    params = flatten_params(cfg.to_dict())
    params.update(environment_params(world_size))
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size % model_parallel == 0:
        params["parallel.dp"] = str(world_size // model_parallel)
    return params


def build_tracker(cfg: Config, rank: int, world_size: int | None = None) -> Tracker:
    """:class:`MLflowTracker` on rank 0 when ``tracking.enabled``, else :class:`NullTracker`.

    ``world_size`` defaults to ``$WORLD_SIZE`` (torchrun sets it), else 1. Builds no network
    connection: the first contact with the store happens in the background.
    """
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    cfg.tracking.validate()
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.tracking
    return MLflowTracker(
        uri=resolve_tracking_uri(cfg),
        experiment=t.experiment,
        launch_id=resolve_launch_id(run_dir),
        spool_dir=run_dir / "mlflow_spool",
        base_params=stage_params(cfg, world_size),
        resolved_config=cfg.to_dict(),
        flush_interval_s=t.flush_interval_s,
        flush_timeout_s=t.flush_timeout_s,
        max_buffered_metrics=t.max_buffered_metrics,
        system_metrics_interval_s=t.system_metrics_interval_s,
        http_timeout_s=t.http_timeout_s,
    )
