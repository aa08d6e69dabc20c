"""SLURM_* -> torch.distributed variables: host lists, tasks per node, ports, the exec wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from maven_dist.launch.checks import LaunchError
from maven_dist.launch.slurm_env import (
    PORT_BASE,
    PORT_SPAN,
    TaskEnv,
    first_host,
    port_for_job,
    task_env_from_slurm,
    tasks_per_node,
)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("localhost", "localhost"),
        ("gpu[03-05,9]", "gpu03"),
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("cpu1,gpu[03-05]", "cpu1"),
        ("rack[1-2]-n[07-08]", "rack1-n07"),
        ("node[0012,0100-0101]", "node0012"),
        ("a-b.c", "a-b.c"),
    ],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "gpu[01-02", "[]"])
def test_first_host_rejects_garbage(bad: str) -> None:
    with pytest.raises(LaunchError):
        first_host(bad)


def test_tasks_per_node_expands_slurm_compression() -> None:
    assert tasks_per_node("8") == [8]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4,4(x2)") == [4, 4, 4]
    with pytest.raises(LaunchError, match="tasks-per-node"):
        tasks_per_node("2(x)")


def test_port_depends_only_on_job_id_and_stays_out_of_ephemeral_range() -> None:
    assert port_for_job(12345) == port_for_job("12345") == PORT_BASE + 12345
    assert port_for_job("77_3") == port_for_job(773)  # array job "77_3"
    for job in (0, 1, PORT_SPAN - 1, PORT_SPAN, 10**9 + 7):
        assert PORT_BASE <= port_for_job(job) < PORT_BASE + PORT_SPAN < 32768
    assert port_for_job(1) != port_for_job(2)


def _task_env(**extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    env.update(extra)
    return env


def test_dist_env_prefers_the_step_over_the_allocation() -> None:
    dist = task_env_from_slurm(_task_env())
    assert dist == TaskEnv(
        rank=5,
        local_rank=1,
        world_size=8,
        local_world_size=4,
        master_addr="gpu07",
        master_port=PORT_BASE + 4242,
    )
    assert dist.as_environ() == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(PORT_BASE + 4242),
    }


def test_dist_env_falls_back_to_job_variables_and_honours_pinned_rendezvous() -> None:
    env = _task_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    for key in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE"):
        del env[key]
    dist = task_env_from_slurm(env)
    assert (dist.world_size, dist.local_world_size, dist.master_addr, dist.master_port) == (
        16,
        8,
        "10.0.0.1",
        29500,
    )


def test_dist_env_names_the_missing_variable() -> None:
    env = _task_env()
    del env["SLURM_PROCID"]
    with pytest.raises(LaunchError, match="SLURM_PROCID is not set.*srun"):
        task_env_from_slurm(env)
    with pytest.raises(LaunchError, match="outside the 8 tasks"):
        task_env_from_slurm(_task_env(SLURM_PROCID="8"))


def test_exec_wrapper_sets_the_variables_for_the_command() -> None:
    """`python -m maven_dist.launch.slurm_env -- CMD` execs CMD with the derived env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_"))}
    env.update(_task_env())
    probe = "import json, os; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}))"
    out = subprocess.run(
        [sys.executable, "-m", "maven_dist.launch.slurm_env", "--", sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(PORT_BASE + 4242),
    }


def test_exec_wrapper_outside_slurm_is_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        [sys.executable, "-m", "maven_dist.launch.slurm_env", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "SLURM_PROCID is not set" in out.stderr
