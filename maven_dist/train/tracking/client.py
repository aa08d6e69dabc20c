"""The one way the package opens an MLflow store: :func:`mlflow_client`."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` or ``sqlite:///relative``)."""
    return Path(uri[len(SQLITE_PREFIX) :]) if uri.startswith(SQLITE_PREFIX) else None


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient of the store at ``uri``, with the store created.

    MLflow creates a SQLite store's tables (alembic migrations) when a process first opens it. Two
    processes opening a new store at once both migrate it and break its schema: the arms of a sweep's
    job array did, and the second arm's runs were refused ("Online migration", "No such index") and
    lost. A SQLite store is therefore first opened under an exclusive lock on ``DB.lock`` beside it;
    the process that waited finds the tables made. A server store (``http://``) migrates once, in the
    server.
    """
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
