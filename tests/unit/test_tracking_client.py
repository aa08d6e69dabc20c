"""`mlflow_client`: processes that open one new SQLite store at the same moment (the arms of a sweep's
job array) all get a working store and none of their runs is lost."""

from __future__ import annotations

import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from maven_dist.train.tracking.client import sqlite_path
from tests.helpers.torchrun import REPO, cpu_env

OPENER = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store
from maven_dist.train.tracking.client import mlflow_client
go = Path(sys.argv[2])
Path(f"{go}.{sys.argv[3]}").touch()  # imported; now wait for the others
while not go.exists():
    time.sleep(0.005)
client = mlflow_client(sys.argv[1])
experiment = client.get_experiment_by_name("race") or client.get_experiment(client.create_experiment("race"))
client.set_terminated(client.create_run(experiment.experiment_id, run_name=sys.argv[3]).info.run_id)
"""


def test_processes_creating_one_sqlite_store_at_once_all_keep_their_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, uri, str(go), f"arm{i}"],
            cwd=REPO,
            env=cpu_env(),
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    # Imported first, then released together: both open the new store at the same moment.
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.arm*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "race"]
    assert len(experiments) == 1
    names = sorted(r.info.run_name for r in client.search_runs([experiments[0].experiment_id]))
    assert names == ["arm0", "arm1"]


def test_sqlite_path_reads_absolute_and_relative_uris():
    assert str(sqlite_path("sqlite:////abs/dir/mlflow.db")) == "/abs/dir/mlflow.db"
    assert str(sqlite_path("sqlite:///runs/mlflow.db")) == "runs/mlflow.db"
    assert sqlite_path("http://127.0.0.1:5000") is None
