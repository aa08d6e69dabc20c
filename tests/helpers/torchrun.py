"""Run a module or script under torchrun on CPU/gloo and fail with its output when it fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = os.environ | {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    return env | extra


def failure_report(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    """The command, the ranks' own error lines first (warnings flood the tail), then the output tails."""
    rank_errors = [
        line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Warning" not in line
    ]
    return (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- rank errors\n"
        + "\n".join(rank_errors[-60:])
        + f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def torchrun(
    nproc: int, args: list[str], timeout: int = 900, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc ARGS` (ARGS: `-m module ...` or `script.py ...`)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(failure_report(cmd, proc))
    return proc


def train_command(nproc: int, recipe: str, overrides: list[str], extra: list[str] | None = None) -> list[str]:
    """The command a user runs for one stage: plain python for one rank, torchrun for more."""
    args = ["-m", "maven_dist.train", recipe, *(f"--set={o}" for o in overrides), *(extra or [])]
    if nproc == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]


def run_train(
    nproc: int,
    recipe: str,
    overrides: list[str],
    extra: list[str] | None = None,
    timeout: int = 900,
    check: bool = True,
) -> subprocess.CompletedProcess:
    cmd = train_command(nproc, recipe, overrides, extra)
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(failure_report(cmd, proc))
    return proc
