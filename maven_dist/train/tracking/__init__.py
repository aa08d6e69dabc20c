"""MLflow experiment tracking: rank 0 writes a durable record of each run, and an idempotent sync sends it
to MLflow (while training, by the next stage, or ``maven sync RUN_DIR``); an outage or a SIGKILL loses
nothing. The layout in the store, the record and the sync are described in docs/experiments.md."""

from __future__ import annotations

import os
from pathlib import Path

from maven_dist.config import Config
from maven_dist.train.provenance import git_sha, package_versions

from .run_info import TRACKING_URI_ENV, flatten_params, resolve_launch_id
from .tracker import MLflowTracker, NullTracker, RunStatus, Tracker

__all__ = ["MLflowTracker", "NullTracker", "RunStatus", "Tracker", "build_tracker", "resolve_tracking_uri"]


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``$MAVEN_TRACKING_URI``, else ``sqlite:///{run_dir}/mlflow.db`` (absolute)."""
    uri = cfg.tracking.uri or os.environ.get(TRACKING_URI_ENV, "").strip()
    run_dir = Path(cfg.run_dir).resolve()
    return uri.replace("{run_dir}", str(run_dir)) if uri else f"sqlite:///{run_dir / 'mlflow.db'}"


def build_tracker(cfg: Config, rank: int, world_size: int | None = None) -> Tracker:
    """Rank 0: an :class:`MLflowTracker` with the flattened config, layout, code and package versions as
    params, syncing when ``tracking.enabled``; any other rank: a :class:`Tracker` that does nothing."""
    if rank != 0:
        return NullTracker()
    cfg.tracking.validate()
    t, world_size = cfg.tracking, world_size or int(os.environ.get("WORLD_SIZE", "1"))
    params = flatten_params(cfg.to_dict()) | {f"env.version.{k}": v for k, v in package_versions().items()}
    params |= {"parallel.world_size": str(world_size), "env.git_sha": git_sha()}
    if world_size % (model_parallel := cfg.parallel.tp * cfg.parallel.pp) == 0:
        params["parallel.dp"] = str(world_size // model_parallel)
    return MLflowTracker(uri=resolve_tracking_uri(cfg) if t.enabled else None, experiment=t.experiment,
                         launch_id=resolve_launch_id(cfg.run_dir), run_dir=cfg.run_dir, cfg=t,
                         base_params=params, resolved_config=cfg.to_dict())  # fmt: skip
