"""The stage runs the tracker writes (tag ``maven.run_kind=stage``; an evaluation is a stage named
``eval-<model>``), read from one or several MLflow stores with ``mlflow.search_runs`` into pandas."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pandas as pd

from .client import mlflow_client, sqlite_path

INHERITED_TAGS = ("maven.sweep", "maven.arm")  # a stage run takes them from its parent run if it lacks them


@dataclass
class RunSummary:
    """A stage run of the store at ``store``: ``metrics`` the latest value of each, ``start_time`` in ms since
    the epoch, ``history`` the ``(step, value)`` points by step of the keys :func:`load_histories` loaded."""

    run_id: str
    stage: str
    experiment: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    launch_id: str = ""
    store: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    start_time: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def find_runs_in_stores(uris: Sequence[str], experiments: Sequence[str] = (), stages: Sequence[str] = (),
                        launch_ids: Sequence[str] = (), sweep: str | None = None
                        ) -> list[RunSummary]:  # fmt: skip
    """Stage runs of ``experiments`` (default: all active ones), store by store, then by start time.
    ``stages`` keeps those stages (and the evaluations unless it names an ``eval-*`` one), ``launch_ids``
    those launches, ``sweep`` the launches whose parent or stage runs carry ``maven.sweep=<sweep>``. Raises
    ``ValueError`` for an experiment in none of the stores."""
    found, missing = [], set(experiments)
    for uri in uris:
        frame, names = _search(uri, experiments)
        missing -= set(names.values())
        if frame.empty:
            continue
        tags = frame.reindex(columns=[f"tags.maven.{k}" for k in ("run_kind", "stage", "launch_id", "sweep")])
        kind, stage, launch_id, sweep_tag = (column.fillna("") for _, column in tags.items())
        launch = frame["experiment_id"] + "/" + launch_id
        evals = stage.str.startswith("eval-") & (not any(s.startswith("eval-") for s in stages))
        keep = (kind == "stage") & ((stage.isin(stages) | evals) if stages else True)
        keep &= launch_id.isin(launch_ids) if launch_ids else True
        keep &= launch.isin(set(launch[sweep_tag == sweep])) if sweep is not None else True
        parents = {launch[i]: _prefixed(row, "tags.") for i, row in frame[kind == "launch"].iterrows()}
        for i, row in frame[keep].iterrows():
            tags = {k: v for k, v in parents.get(launch[i], {}).items() if k in INHERITED_TAGS}
            start = 0 if pd.isna(row["start_time"]) else int(row["start_time"].timestamp() * 1000)
            found.append(RunSummary(row["run_id"], stage[i], names[row["experiment_id"]], row["status"],
                                    _prefixed(row, "metrics."), _prefixed(row, "params."), launch_id[i], uri,
                                    tags | _prefixed(row, "tags."), start))  # fmt: skip
    if missing:
        raise ValueError(f"no experiment named {sorted(missing)} in {', '.join(uris)}")
    return found


def load_histories(runs: Iterable[RunSummary], keys: Sequence[str]) -> None:
    """Fill ``run.history[key]`` for each ``key`` the run has; a step logged twice (a resumed stage repeats
    the steps after its checkpoint) keeps its latest value."""
    for run in runs:
        client = mlflow_client(run.store)
        for key in (k for k in keys if k in run.metrics):
            points = sorted(client.get_metric_history(run.run_id, key), key=lambda m: (m.step, m.timestamp))
            run.history[key] = sorted({m.step: m.value for m in points}.items())


def store_name(uri: str) -> str:
    """A short name for a store: the run directory of ``sqlite:///RUN_DIR/mlflow.db``, the file of another
    SQLite store, ``host:port`` of a server (never its credentials: the name goes into reports)."""
    if path := sqlite_path(uri):
        return path.parent.name if path.name == "mlflow.db" else path.name
    host, port = urlparse(uri).hostname, urlparse(uri).port
    return (f"{host}:{port}" if port else host) if host else uri


def _search(uri: str, experiments: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """``mlflow.search_runs`` over ``experiments`` (all active ones if none), and their names by id."""
    import mlflow

    client = mlflow_client(uri)  # opens (creates, migrates) a SQLite store under its lock
    found = [client.get_experiment_by_name(n) for n in experiments] or client.search_experiments()
    if not (names := {e.experiment_id: e.name for e in found if e is not None}):
        return pd.DataFrame(), names
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # search_runs reads the process's tracking URI
    try:
        return mlflow.search_runs(list(names), order_by=["start_time ASC"]), names
    finally:
        mlflow.set_tracking_uri(previous)


def _prefixed(row: pd.Series, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in row.dropna().items() if k.startswith(prefix)}
