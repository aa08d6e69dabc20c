"""What produced a run: flattened config, layout, code and library versions, cluster job."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from maven_dist.config import Config
from maven_dist.parallel.dims import ParallelDims

_PACKAGES = ("maven_dist", "torch", "deepspeed", "transformers", "megatron-core", "mlflow", "pyarrow")


@lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, name + ".")
        else:
            out[name] = str(value)
    return out


@dataclass(frozen=True)
class Provenance:
    params: dict[str, str]
    tags: dict[str, str]
    manifest: dict


def run_provenance(cfg: Config, dims: ParallelDims) -> Provenance:
    versions = package_versions()
    layout = {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp, "world_size": dims.world_size}
    params = flatten(cfg.to_dict()) | {f"layout.{k}": str(v) for k, v in layout.items()}
    params |= {"git_sha": git_sha(), "recipe_fingerprint": cfg.fingerprint()}
    params |= {f"version.{k}": v for k, v in versions.items()}
    tags = {"stage": cfg.stage.name, "git_sha": git_sha()}
    for env_name, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_JOB_NODELIST", "slurm_nodelist"),
                          ("SLURM_RESTART_COUNT", "slurm_restart_count"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id")):
        if env_name in os.environ:
            tags[tag] = os.environ[env_name]
    manifest = {"git_sha": git_sha(), "versions": versions, "layout": layout, "config": asdict(cfg)}
    return Provenance(params, tags, manifest)
