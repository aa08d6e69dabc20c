"""Which code computed a run: the git commit and the package versions (checkpoint manifests, MLflow params)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

VERSIONED = (
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
"""Packages whose versions change what training computes or how it is logged."""


@functools.cache
def git_sha() -> str:
    """HEAD of the checkout the code runs from, ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[2])]
    try:
        sha = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    """Python's and :data:`VERSIONED`'s versions ("absent" if not installed), and CUDA's if torch is loaded."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    if "torch" in sys.modules:  # never import torch just to ask
        out["cuda"] = str(sys.modules["torch"].version.cuda)
    return out
