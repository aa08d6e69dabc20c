#!/usr/bin/env bash
# slurm/stage2.sh - stage 2 of the MaVEn recipe: discrete alignment (new vocabulary rows).
#
#   sbatch slurm/stage2.sh [RECIPE] [--set key=value ...]   # RECIPE defaults to recipes/maven-7b/stage2.yaml
#   bash slurm/stage2.sh [RECIPE] [--set key=value ...]     # submits itself with slurm/env.sh's settings
#
# Partition, account and GPUs come from slurm/env.sh (`source slurm/env.sh` before a plain sbatch).
# One task per GPU; the defaults below fit 8-GPU nodes. The work happens in slurm/launch.sh.
#SBATCH --job-name=maven-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=maven-stage2-%j.out

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MAVEN_REPO:-}" ]; then
    # inside the job this file is a copy in Slurm's spool: find the repository through scontrol
    _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    MAVEN_REPO=$(cd "$(dirname "${_cmd:-$SLURM_SUBMIT_DIR/slurm/x}")/.." && pwd)
fi
_launch=${MAVEN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm/launch.sh
[ -f "$_launch" ] || { echo "error: $_launch not found; set MAVEN_REPO=/path/to/maven_dist" >&2; exit 2; }
# shellcheck source=slurm/launch.sh
source "$_launch"
maven_stage_main stage2 "$@"
