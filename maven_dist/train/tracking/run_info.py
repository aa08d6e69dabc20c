"""What identifies and describes a run: launch id, flattened params, code version, Slurm placement.

All values are plain strings sized to MLflow's limits (param values 6000 characters, tag values 8000,
keys 250), so nothing here can make a logging call fail.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow/utils/validation.py); values past them are rejected by the store.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_CALL = 1000

LAUNCH_ID_ENV = "MAVEN_LAUNCH_ID"
LAUNCH_ID_FILE = "launch_id"
RUN_NAME_ENV = "MAVEN_RUN_NAME"
"""The parent run's name (``maven pipeline``: the recipe's; ``maven sweep``: sweep/arm)."""
SWEEP_ENV, ARM_ENV = "MAVEN_SWEEP", "MAVEN_ARM"
"""Set by ``maven sweep``: tagged on the parent and every stage run as ``maven.sweep`` / ``maven.arm``."""
# Launch ids go into MLflow search filters (quoted) and file names: keep them to a safe alphabet.
_LAUNCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Packages whose versions change what training computes or how it is logged.
VERSIONED_PACKAGES = (
    "maven_dist",
    "torch",
    "deepspeed",
    "transformers",
    "megatron-core",
    "mlflow",
    "numpy",
    "pyarrow",
    "tokenizers",
)

# Slurm environment -> tag name (tags, not params: they change on every requeue of the same stage).
SLURM_TAGS = {
    "SLURM_JOB_ID": "slurm.job_id",
    "SLURM_JOB_NAME": "slurm.job_name",
    "SLURM_JOB_NODELIST": "slurm.nodelist",
    "SLURM_JOB_NUM_NODES": "slurm.num_nodes",
    "SLURM_JOB_PARTITION": "slurm.partition",
    "SLURM_RESTART_COUNT": "slurm.restart_count",
}


def resolve_launch_id(run_dir: str | Path) -> str:
    """The launch this process belongs to: ``$MAVEN_LAUNCH_ID``, else ``{run_dir}/launch_id`` (created once).

    The first stage to start in a run directory writes the file; every later stage (a separate process,
    possibly a later Slurm job) reads it, so all stages of a launch share one parent run. Creation is
    atomic (``O_EXCL``), so two processes racing to create it agree on one id.
    """
    env = os.environ.get(LAUNCH_ID_ENV, "").strip()
    if env:
        return _checked_launch_id(env, f"${LAUNCH_ID_ENV}")
    path = Path(run_dir) / LAUNCH_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return _checked_launch_id(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    new = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        # Another process won the race (or left an empty file behind): use what is there.
        text = path.read_text().strip()
        if text:
            return text
        path.write_text(new + "\n")
        return new
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new


def new_launch_id(run_dir: str | Path) -> str:
    """Start a new launch in `run_dir`: a fresh id replaces ``{run_dir}/launch_id`` (``--new-launch``)."""
    path = Path(run_dir) / LAUNCH_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new + "\n")
    tmp.replace(path)
    return new


def launch_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags every run of this launch carries: the sweep and arm it belongs to (when ``maven sweep`` runs it)."""
    environ = os.environ if environ is None else environ
    pairs = {"maven.sweep": environ.get(SWEEP_ENV, ""), "maven.arm": environ.get(ARM_ENV, "")}
    return {k: v for k, v in pairs.items() if v}


def launch_run_name(environ: Mapping[str, str] | None = None) -> str:
    """The parent run's name, or '' (then the launch id names it)."""
    return (os.environ if environ is None else environ).get(RUN_NAME_ENV, "").strip()


def _checked_launch_id(value: str, source: str) -> str:
    if not _LAUNCH_ID_RE.match(value):
        raise ValueError(
            f"launch id {value!r} from {source} must be 1-128 characters of letters, digits, '.', '_', '-' "
            "(starting with a letter or digit); fix or delete it"
        )
    return value


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping to dotted keys with string values (lists as JSON, empty mappings as ``{}``)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=name + "."))
        else:
            out[name] = param_str(value)
    return out


def param_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def clip_key(key: str) -> str:
    """Fit a key in MLflow's 250 characters; a long key keeps its head and a hash of the whole, to stay unique."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return key[: MAX_KEY_LENGTH - 11] + "~" + digest


def clip_value(value: str, limit: int) -> str:
    """Fit a value in ``limit`` characters, marking the cut so nobody mistakes it for the whole value."""
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def clip_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {clip_key(k): clip_value(param_str(v), MAX_PARAM_VALUE_LENGTH) for k, v in params.items()}


def clip_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {clip_key(k): clip_value(param_str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}


@functools.cache
def git_sha(repo: Path | None = None) -> str:
    """HEAD of the checkout the code runs from, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    repo = repo or Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    torch = sys.modules.get("torch")  # only report CUDA if the trainer already imported torch
    if torch is not None:
        out["cuda"] = str(torch.version.cuda)
    return out


def environment_params(world_size: int) -> dict[str, str]:
    """Params every stage run gets besides the config: world size, code version, package versions."""
    params = {"parallel.world_size": str(world_size), "env.git_sha": git_sha()}
    params.update({f"env.version.{k}": v for k, v in package_versions().items()})
    return params


def environment_tags() -> dict[str, str]:
    """Tags that change between attempts of the same stage: Slurm job and nodes, host, code version."""
    tags = {"maven.hostname": socket.gethostname(), "mlflow.source.git.commit": git_sha()}
    for env, tag in SLURM_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array task's own id is <array job>_<task>
        tags["slurm.job_id"] = (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        )
    return tags
