# slurm/env.local.sh - settings for the single-node Slurm of slurm/local/start.sh (CI, trying the
# Slurm path on one machine): CPU only, two tasks, one CPU each. Use it with
#   MAVEN_SLURM_ENV=slurm/env.local.sh slurm/recipe.sh recipes/tiny
# or `source slurm/env.local.sh` before a plain sbatch. See slurm/env.sh for what each line means.

MAVEN_PARTITION="${MAVEN_SLURM_PARTITION:-debug}"
MAVEN_ACCOUNT=""
MAVEN_QOS=""
MAVEN_NODES=1
MAVEN_GPUS_PER_NODE=0
MAVEN_CPU_TASKS_PER_NODE=2
MAVEN_CPUS_PER_TASK=1
MAVEN_TIME="00:30:00"
MAVEN_SBATCH_EXTRA=()
MAVEN_PYTHON=""
MAVEN_RUN_DIR="${MAVEN_RUN_DIR:-}"
MAVEN_LOG_DIR="${MAVEN_LOG_DIR:-}"
MAVEN_MAX_REQUEUES=10
export DS_ACCELERATOR=cpu     # DeepSpeed must not look for CUDA on a CPU node
export OMP_NUM_THREADS=1      # one core per task

[ -n "$MAVEN_PARTITION" ] && export SBATCH_PARTITION=$MAVEN_PARTITION
[ -n "$MAVEN_TIME" ] && export SBATCH_TIMELIMIT=$MAVEN_TIME
# the jobs read this same file again
MAVEN_SLURM_ENV=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
export MAVEN_SLURM_ENV
