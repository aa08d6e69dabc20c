"""torch.distributed environment from Slurm's: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

``srun`` starts one task per GPU and tells each task who it is through ``SLURM_*`` variables; the
trainer reads the standard torch.distributed variables (what torchrun sets). This module is the one
translation between the two, used by ``slurm/launch.sh`` (through the ``__main__`` below, which
sets the variables and ``exec``\\s the trainer) and by the submitit callable.

Rendezvous is on the first host of the allocation, on a port derived from the job id so that two
jobs sharing a node do not collide and a requeued job (same id) finds the same port again.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from maven_dist.launch.checks import LaunchError

PORT_BASE = 15000
"""Derived rendezvous ports live in [15000, 30000): below Linux's ephemeral range (32768+)."""
PORT_SPAN = 15000


@dataclass(frozen=True)
class TaskEnv:
    """One task's place in the job, in torch.distributed's terms."""

    rank: int
    """Global rank (SLURM_PROCID)."""
    local_rank: int
    """Rank on this node (SLURM_LOCALID); the GPU index the task uses."""
    world_size: int
    """Tasks in the step (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS)."""
    local_world_size: int
    """Tasks on this node."""
    master_addr: str
    """Host of rank 0: the first host of the node list."""
    master_port: int
    """TCP port of the rendezvous store on `master_addr`."""

    def as_environ(self) -> dict[str, str]:
        """The variables torchrun would set."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist, as ``scontrol show hostnames`` would print it first.

    ``gpu[03-05,9],cpu1`` -> ``gpu03``; ``rack[1-2]-n[07-08]`` -> ``rack1-n07``. Slurm keeps the
    list sorted and the first host of an allocation runs the batch script and rank 0.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("the Slurm node list is empty (SLURM_JOB_NODELIST / SLURM_STEP_NODELIST)")
    depth = 0
    end = len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first host expression
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]

    def first_of_range(match: re.Match[str]) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_range, first)
    if "[" in host or "]" in host or not host:
        raise LaunchError(f"cannot parse the Slurm node list {nodelist!r}")
    return host


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed ``SLURM_STEP_TASKS_PER_NODE``: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise LaunchError(f"cannot parse the Slurm tasks-per-node spec {spec!r}")
        out += [int(match.group(1))] * int(match.group(2) or 1)
    return out


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port in [PORT_BASE, PORT_BASE + PORT_SPAN) that depends only on the job id."""
    digits = re.sub(r"\D", "", str(job_id))  # array jobs: "1234_5"
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def _require(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name, "")
        if value != "":
            return value
    raise LaunchError(
        f"{' / '.join(names)} is not set: this must run as a task of `srun` inside a Slurm job "
        "(slurm/launch.sh and the submitit launcher do that)"
    )


def task_env_from_slurm(environ: Mapping[str, str] | None = None) -> TaskEnv:
    """Derive this task's :class:`TaskEnv` from the ``SLURM_*`` variables of an srun task.

    MASTER_ADDR / MASTER_PORT already in the environment win (a user pinning the rendezvous).
    Step-level variables win over job-level ones: ``srun`` inside a batch script may start
    fewer tasks than the allocation holds.
    """
    env = os.environ if environ is None else environ
    rank = int(_require(env, "SLURM_PROCID"))
    local_rank = int(_require(env, "SLURM_LOCALID"))
    world_size = int(_require(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    nodelist = _require(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world_size)
    per_node = tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    local_world_size = per_node[node] if node < len(per_node) else per_node[0]
    if not 0 <= rank < world_size:
        raise LaunchError(f"SLURM_PROCID={rank} is outside the {world_size} tasks of this step")
    master_addr = env.get("MASTER_ADDR") or first_host(nodelist)
    port = env.get("MASTER_PORT") or str(port_for_job(_require(env, "SLURM_JOB_ID")))
    return TaskEnv(rank, local_rank, world_size, local_world_size, master_addr, int(port))


def main(argv: list[str] | None = None) -> None:
    """``python -m maven_dist.launch.slurm_env -- CMD ARGS...``: exec CMD with the torch.distributed
    variables set from this srun task's ``SLURM_*`` variables."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m maven_dist.launch.slurm_env -- CMD [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    try:
        dist = task_env_from_slurm()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.update(dist.as_environ())
    # exec, not a child: the trainer must receive Slurm's signals (USR2, TERM) itself.
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
