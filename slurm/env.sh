# slurm/env.sh - your cluster's settings for slurm/stage*.sh and slurm/recipe.sh. Edit once.
#
# Read (sourced) in three places:
#   * `bash slurm/stage4.sh ...` and `slurm/recipe.sh ...` read it to build the sbatch command;
#   * inside every job, slurm/launch.sh reads it again (python, run dir, extra environment);
#   * `source slurm/env.sh` in your shell makes a plain `sbatch slurm/stage4.sh` use it too: the
#     SBATCH_* variables exported at the bottom win over the scripts' #SBATCH lines.
# Another file can stand in for this one: MAVEN_SLURM_ENV=/path/to/env.sh (slurm/env.local.sh is
# the one for the single-node Slurm of slurm/local/start.sh).

MAVEN_PARTITION=""           # sbatch --partition; empty: the cluster's default partition
MAVEN_ACCOUNT=""             # sbatch --account; empty: your default account
MAVEN_QOS=""                 # sbatch --qos; empty: the default
MAVEN_NODES=1                # nodes per stage
MAVEN_GPUS_PER_NODE=8        # GPUs per node = tasks per node (one task per GPU); 0 = CPU-only nodes
MAVEN_CPU_TASKS_PER_NODE=2   # tasks per node when MAVEN_GPUS_PER_NODE=0
MAVEN_CPUS_PER_TASK=10       # data-loader workers + the main process, per GPU
MAVEN_TIME=""                # e.g. 2-00:00:00 to override every stage script's --time; empty keeps theirs
MAVEN_SBATCH_EXTRA=()        # anything else for sbatch, e.g. (--constraint=a100 --exclusive)
MAVEN_PYTHON=""              # empty: <repo>/.venv/bin/python if it exists, else python3
MAVEN_RUN_DIR=""             # passed as --set run_dir=... to every stage; empty: the recipe's run_dir
MAVEN_LOG_DIR=""             # sbatch logs; empty: logs/slurm under the directory you submit from
MAVEN_MAX_REQUEUES=50        # a job that asked to be requeued this many times fails instead
# One tracking server for every job (slurm/mlflow_server.sh starts one; recipes' tracking.uri still wins):
# export MAVEN_TRACKING_URI=http://mlflow-host:5000
# Environment for the training processes (NCCL, HF cache, ...), e.g.:
# export NCCL_SOCKET_IFNAME=ib0
# export HF_HUB_OFFLINE=1

# ------------------------------------------------------------------------ for a plain `sbatch`
[ -n "$MAVEN_PARTITION" ] && export SBATCH_PARTITION=$MAVEN_PARTITION
[ -n "$MAVEN_ACCOUNT" ] && export SBATCH_ACCOUNT=$MAVEN_ACCOUNT
[ -n "$MAVEN_QOS" ] && export SBATCH_QOS=$MAVEN_QOS
[ -n "$MAVEN_TIME" ] && export SBATCH_TIMELIMIT=$MAVEN_TIME
[ "${MAVEN_GPUS_PER_NODE:-0}" -gt 0 ] && export SBATCH_GPUS_PER_NODE=$MAVEN_GPUS_PER_NODE
# the jobs read this same file again
MAVEN_SLURM_ENV=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
export MAVEN_SLURM_ENV
