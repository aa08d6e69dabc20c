"""The submitit callable that trains one stage: Checkpointable, so preemption becomes a requeue.

submitit starts one process per task (one per GPU) and calls :class:`StageJob` in each. The
callable sets the torch.distributed variables, installs the preemption flag and runs the trainer
in-process (``python -m maven_dist.train RECIPE --set ...``, by module). When USR2 arrives
(Slurm's warning before the time limit, or ``job._interrupt()``), submitit's own handler would
pickle and requeue at once, wherever the trainer happens to be; instead our flag lets the trainer
finish its optimizer step, save and exit with REQUEUE_EXIT_CODE, and only then does rank 0 hand
over to submitit's handler, which calls :meth:`StageJob.checkpoint` and requeues the job. The
requeued job runs the trainer again, which resumes from the checkpoint it just wrote.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import submitit

from maven_dist.contract.preemption import (
    REQUEUE_EXIT_CODE,
    install_preemption_handler,
    received_signals,
    reset_preemption,
)
from maven_dist.launch.slurm_env import TaskEnv, port_for_job, task_env_from_slurm

USR2_GRACE_S = 3.0
"""How long a task that saved after TERM waits for the USR2 that may follow before just exiting."""


def task_env_from_submitit(job_env: submitit.JobEnvironment) -> TaskEnv:
    """torch.distributed variables for a submitit task: from SLURM_* on Slurm, else local."""
    if job_env.cluster == "slurm":
        return task_env_from_slurm(os.environ)
    # local executor: every task on this machine; the job id is the controller's pid
    return TaskEnv(
        rank=job_env.global_rank,
        local_rank=job_env.local_rank,
        world_size=job_env.num_tasks,
        local_world_size=job_env.num_tasks,
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT") or port_for_job(job_env.job_id)),
    )


def run_entry(entry: str, argv: list[str]) -> int:
    """Run ``python -m entry argv...`` (or ``python entry.py argv...``) in this process; its exit code."""
    saved = sys.argv
    sys.argv = [entry, *argv]
    try:
        if entry.endswith(".py"):
            runpy.run_path(entry, run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


@dataclass
class StageJob(submitit.helpers.Checkpointable):
    """Train one stage: ``StageJob("recipes/tiny/stage4.yaml", ["run_dir=runs/x"])()``."""

    recipe: str
    """Recipe file of the stage."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides, as the trainer's ``--set``."""
    entry: str = "maven_dist.train"
    """Module (or .py file) run in each task; the launcher's plumbing test swaps in a stand-in."""
    attempt: int = 0
    """How many times this stage was requeued before this run (MLflow tag launch.requeue_count)."""

    def __call__(self) -> int:
        job_env = submitit.JobEnvironment()
        dist = task_env_from_submitit(job_env)
        os.environ.update(dist.as_environ())
        os.environ["MAVEN_LAUNCHER"] = f"submitit-{job_env.cluster}"
        os.environ["MAVEN_REQUEUE_COUNT"] = str(self.attempt)
        # submitit's USR2 handler checkpoints and requeues immediately; keep it for later.
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        reset_preemption()
        install_preemption_handler()
        argv = [self.recipe]
        for item in self.overrides:
            argv += ["--set", item]
        code = run_entry(self.entry, argv)
        if code == REQUEUE_EXIT_CODE:
            return self._after_save(dist, submitit_handler)
        if code != 0:
            raise RuntimeError(
                f"{self.entry} {' '.join(argv)} exited with code {code} on rank {dist.rank}; see this task's log"
            )
        return code

    def _after_save(self, dist: TaskEnv, submitit_handler: object) -> int:
        """The trainer saved and asked for a requeue: who requeues depends on which signal came."""
        # submitit's _interrupt() and Slurm's preemption of submitit jobs send TERM, then USR2;
        # a trainer that saved between the two must still see the USR2 to requeue.
        deadline = time.monotonic() + USR2_GRACE_S
        while signal.SIGUSR2 not in received_signals() and time.monotonic() < deadline:
            time.sleep(0.05)
        if signal.SIGUSR2 not in received_signals() or not callable(submitit_handler):
            # TERM only: Slurm itself is cancelling or requeueing the job; nothing to add.
            raise SystemExit(REQUEUE_EXIT_CODE)
        # Rank 0: submitit calls checkpoint(), dumps the new submission, requeues and exits.
        # Other ranks: the handler returns at once; exit so the local executor can restart all tasks.
        submitit_handler(signal.SIGUSR2, None)
        raise SystemExit(REQUEUE_EXIT_CODE)

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """What to run after the requeue: the same stage; the trainer resumes from its checkpoint."""
        return submitit.helpers.DelayedSubmission(replace(self, attempt=self.attempt + 1))
