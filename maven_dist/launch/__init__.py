"""Launching stages: on Slurm (slurm/*.sh, submitit) or locally; kept apart from training.

* ``maven_dist.contract.preemption`` (shared with the trainer) - the flag the trainer polls, and
  ``REQUEUE_EXIT_CODE`` (75) it exits with;
* ``slurm_env`` - RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM_* (and the exec
  wrapper that slurm/launch.sh puts in front of the trainer);
* ``checks`` - recipe, world size vs tp*pp, GPUs: refused before any rank starts;
* ``stage_job`` - the submitit Checkpointable callable; ``__main__`` - ``python -m maven_dist.launch``.

Nothing is imported here: the exec wrapper and the trainer import only what they use.
"""
