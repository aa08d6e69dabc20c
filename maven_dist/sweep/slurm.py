"""A sweep on Slurm through submitit: the shared stages as one job, then the arms as one job array that
waits for it (``afterok``); each array task runs its arm's ``maven pipeline`` on one node.

A preempted or timed-out task is requeued by submitit (``checkpoint``) and its pipeline resumes from the
arm's checkpoints; a task whose arm already finished returns at once. Multi-node arms are not arranged
here: submit those arms with ``slurm/recipe.sh RECIPE --set ...`` (docs/experiments.md).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import submitit

from maven_dist.sweep.runner import Job

# submitit treats a USR2 as a time-out, not a preemption, when timeout_min <= 10 (see maven launch).
MIN_TIMEOUT_MIN = 11


class ArmTask(submitit.helpers.Checkpointable):
    """One arm (or the shared stages) as a submitit task."""

    def __call__(self, job: Job) -> int:
        if job.finished():
            return 0
        job.prepare_run_dir()
        code = subprocess.call(job.command, env=os.environ | job.env)
        if code != 0:
            raise RuntimeError(f"arm {job.arm}: maven pipeline exited with {code}; see the task's log")
        job.mark_finished()
        return 0


def submit(
    shared: Job | None,
    arms: list[Job],
    folder: Path,
    gpus_per_node: int,
    partition: str | None,
    account: str | None,
    timeout_min: int,
    cpus_per_task: int,
) -> list[str]:
    """Submit the jobs; the Slurm job ids (shared job first, then the array's tasks). ``gpus_per_node``
    0 asks for CPU nodes (no GPU request at all: a cluster without GPU gres rejects even a zero)."""
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(
        nodes=1,
        tasks_per_node=1,  # the pipeline starts one torchrun per stage with a rank per GPU
        gpus_per_node=gpus_per_node or None,
        cpus_per_task=cpus_per_task,
        timeout_min=max(timeout_min, MIN_TIMEOUT_MIN),
        slurm_additional_parameters={"requeue": True, **({"account": account} if account else {})},
    )
    if partition:
        executor.update_parameters(slurm_partition=partition)
    ids = []
    if shared is not None and not shared.finished():
        executor.update_parameters(name=f"{shared.env['MAVEN_SWEEP']}-shared")
        first = executor.submit(ArmTask(), shared)
        ids.append(first.job_id)
        extra = {"requeue": True, "dependency": f"afterok:{first.job_id}", "kill-on-invalid-dep": "yes"}
        if account:
            extra["account"] = account
        executor.update_parameters(slurm_additional_parameters=extra)
    todo = [job for job in arms if not job.finished()]
    if todo:
        executor.update_parameters(name=todo[0].env["MAVEN_SWEEP"], slurm_array_parallelism=len(todo))
        ids += [j.job_id for j in executor.map_array(ArmTask(), todo)]
    return ids
