#!/usr/bin/env bash
# slurm/labels_array.sh - `maven labels` as a Slurm job array: task I of N labels every N-th shard file.
#
#   bash slurm/labels_array.sh SHARDS... --source SOURCE [maven labels options] --num-shards N
#       checks the arguments, then submits itself as N tasks (--array=0-<N-1>) with slurm/env.sh's settings
#   sbatch --array=0-7 --gpus-per-node=1 slurm/labels_array.sh SHARDS... --source SOURCE [options]
#       the array you give: N is its size, its ids must be 0 .. N-1 (settings from #SBATCH / SBATCH_*)
#   sbatch --array=3 --gpus-per-node=1 slurm/labels_array.sh SHARDS... [options] --num-shards 8
#       task 3 of an 8-way split once more (say it failed)
#
# Each task is one process: one GPU with --source grounding_sam (when slurm/env.sh's MAVEN_GPUS_PER_NODE
# is above 0), none for coco and vg, and MAVEN_CPUS_PER_TASK CPUs; partition, account, QOS, time and
# extra options come from slurm/env.sh. MAVEN_ARRAY_MAX_RUNNING=K runs at most K tasks at once. Tasks
# write disjoint shard files; a rerun with any N labels only the shards still missing; a requeued task
# resumes. docs/data_preparation.md ("Splitting the work") has the commands. The work happens in
# slurm/tool_array.sh.
#SBATCH --job-name=maven-labels
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=maven-labels-%A_%a.out

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MAVEN_REPO:-}" ]; then
    # inside the job this file is a copy in Slurm's spool: find the repository through scontrol
    _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    MAVEN_REPO=$(cd "$(dirname "${_cmd:-$SLURM_SUBMIT_DIR/slurm/x}")/.." && pwd)
fi
_slurm=${MAVEN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm
[ -f "$_slurm/tool_array.sh" ] || { echo "error: $_slurm/tool_array.sh not found; set MAVEN_REPO=/path/to/maven_dist" >&2; exit 2; }
# shellcheck source=slurm/tool_array.sh
source "$_slurm/tool_array.sh"
_needs_gpu=0
[ "$(maven_array_option source "$@")" = grounding_sam ] && _needs_gpu=1
maven_array_main labels "$_needs_gpu" "$@"
