"""Where a run was launched from, as MLflow tags: launcher, Slurm job id, requeue count.

The launchers export what they know as environment variables before the trainer starts
(``MAVEN_LAUNCHER``, ``MAVEN_REQUEUE_COUNT``, Slurm's own ``SLURM_JOB_ID``...); rank 0 of the
trainer logs :func:`launch_tags` on every (re)start, so a stage run that was preempted three times
shows ``launch.requeue_count=3`` and the job ids it ran under.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def launch_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags describing this launch; empty values are left out."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    tags = {
        "launch.launcher": env.get("MAVEN_LAUNCHER", "slurm" if job_id else "local"),
        "launch.requeue_count": env.get("MAVEN_REQUEUE_COUNT", env.get("SLURM_RESTART_COUNT", "0")),
        "launch.world_size": env.get("WORLD_SIZE", "1"),
        "slurm.job_id": job_id,
        "slurm.job_name": env.get("SLURM_JOB_NAME", ""),
        "slurm.partition": env.get("SLURM_JOB_PARTITION", ""),
        "slurm.nodelist": env.get("SLURM_JOB_NODELIST", ""),
        "slurm.restart_count": env.get("SLURM_RESTART_COUNT", "0") if job_id else "",
        "submitit.folder": env.get("SUBMITIT_FOLDER", ""),
    }
    return {k: v for k, v in tags.items() if v != ""}
