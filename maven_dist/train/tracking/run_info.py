"""What identifies and describes a run: launch id, flattened params, code version, Slurm placement.
Values are strings cut to MLflow's limits (keys 250 characters, params 6000, tags 8000), so no call fails."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maven_dist.contract.atomic_write import write_text_atomic
from maven_dist.train.provenance import git_sha

LAUNCH_ID_ENV, LAUNCH_ID_FILE, RUN_NAME_ENV = "MAVEN_LAUNCH_ID", "launch_id", "MAVEN_RUN_NAME"
SWEEP_ENV, ARM_ENV = "MAVEN_SWEEP", "MAVEN_ARM"  # set by `maven sweep`, tagged as maven.sweep and maven.arm
TRACKING_URI_ENV = "MAVEN_TRACKING_URI"
"""A cluster's shared tracking server for every job (slurm/env.sh; slurm/mlflow_server.sh starts one)."""
PARAM_LIMIT, TAG_LIMIT = 6000, 8000  # MLflow's longest param and tag values
_LAUNCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # goes into search filters and file names
SLURM_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_JOB_NAME": "slurm.job_name",
              "SLURM_JOB_NODELIST": "slurm.nodelist", "SLURM_JOB_NUM_NODES": "slurm.num_nodes",
              "SLURM_JOB_PARTITION": "slurm.partition",
              "SLURM_RESTART_COUNT": "slurm.restart_count"}  # fmt: skip
"""Tags, not params: they change on every requeue of the same stage."""


def resolve_launch_id(run_dir: str | Path) -> str:
    """``$MAVEN_LAUNCH_ID``, else ``{run_dir}/launch_id``, created by the first stage that starts there
    (``O_EXCL``: processes racing to create it agree on one id), so all stages share one parent run."""
    source, value = f"${LAUNCH_ID_ENV}", os.environ.get(LAUNCH_ID_ENV, "").strip()
    if not value:
        source = Path(run_dir) / LAUNCH_ID_FILE
        source.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError), open(source, "x") as f:
            f.write(_fresh_id() + "\n")
        value = source.read_text().strip() or new_launch_id(run_dir)  # empty: left by a killed process
    if not _LAUNCH_ID_RE.match(value):
        raise ValueError(
            f"launch id {value!r} from {source} must be 1-128 characters of letters, digits, '.', '_', '-' "
            "(starting with a letter or digit); fix or delete it"
        )
    return value


def new_launch_id(run_dir: str | Path) -> str:
    """Start a new launch in ``run_dir``: a fresh id replaces ``{run_dir}/launch_id`` (``--new-launch``)."""
    write_text_atomic(Path(run_dir) / LAUNCH_ID_FILE, (new := _fresh_id()) + "\n")
    return new


def _fresh_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def launch_tags() -> dict[str, str]:
    """The sweep and arm this launch belongs to (when ``maven sweep`` runs it), as tags."""
    tags = {"maven.sweep": os.environ.get(SWEEP_ENV, ""), "maven.arm": os.environ.get(ARM_ENV, "")}
    return {k: v for k, v in tags.items() if v}


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping to dotted keys with string values (lists as JSON, empty mappings as ``{}``)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= flatten_params(value, prefix=f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = _text(value)
    return out


def clip_key(key: str) -> str:
    """Fit a key in 250 characters; a long key keeps its head and a hash of the whole, to stay unique."""
    return key if len(key) <= 250 else key[:239] + "~" + hashlib.sha1(key.encode()).hexdigest()[:10]


def clip(items: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Keys and string values fit for MLflow; a cut value is marked, so nobody takes it for the whole."""
    texts = {clip_key(k): _text(v) for k, v in items.items()}
    return {k: v if len(v) <= limit else v[: limit - 14] + "...[truncated]" for k, v in texts.items()}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def environment_tags() -> dict[str, str]:
    """Tags that change between attempts of the same stage: Slurm job and nodes, host, code version."""
    tags = {"maven.hostname": socket.gethostname(), "mlflow.source.git.commit": git_sha()}
    tags |= {tag: os.environ[env] for env, tag in SLURM_TAGS.items() if os.environ.get(env)}
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array task's own id is <array job>_<task>
        tags["slurm.job_id"] = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return tags
