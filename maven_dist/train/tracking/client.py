"""The one way the package opens an MLflow store: :func:`mlflow_client`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` or ``sqlite:///relative``)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient of the store at ``uri``, the store created.

    MLflow's usage telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise (set before its first
    import): it runs a thread (a training process must not fork while one runs), and compute nodes are often
    offline. Two processes opening a new SQLite store at once both migrate its tables and break its schema (a
    sweep's job array lost runs to "Online migration"), so it is first opened under a lock on ``DB.lock``.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store is open (created, migrated) once this returns
    return client
