#!/usr/bin/env bash
# slurm/recipe.sh - submit the four stages of a recipe, each waiting for the previous one to succeed.
#
#   slurm/recipe.sh [RECIPE_DIR] [--from stageN] [--set key=value ...]
#
# RECIPE_DIR (default recipes/maven-7b) holds stage1.yaml ... stage4.yaml. Stage N+1 is submitted
# with --dependency=afterok on stage N, so a failed stage stops the chain (Slurm cancels the later
# jobs: --kill-on-invalid-dep=yes). A stage that is preempted and
# requeued keeps its job id, and the chain waits for it. --from stage3 skips the earlier stages
# (they already ran into the same run_dir). The --set overrides go to every stage; give them a
# common run_dir so that each stage finds the previous one's output. Settings (partition,
# account, GPUs, ...) come from slurm/env.sh or MAVEN_SLURM_ENV.
# Prints one line per stage: "stageN JOBID".
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/launch.sh
source "$here/launch.sh"
maven_find_repo
maven_load_env

recipe_dir=recipes/maven-7b
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then recipe_dir=${1%/}; shift; fi
from=1
if [ "${1:-}" = --from ]; then
    from=${2#stage}
    shift 2
    [[ "$from" =~ ^[1-4]$ ]] || maven_die "--from takes stage1 ... stage4"
fi
[ -d "$recipe_dir" ] || [ -d "$MAVEN_REPO/$recipe_dir" ] || maven_die "recipe directory $recipe_dir does not exist; recipes live under recipes/ (e.g. recipes/tiny)"

# Check every stage before submitting any: a typo in stage 4 should not surface hours later.
for n in $(seq "$from" 4); do
    f=$recipe_dir/stage$n.yaml
    [ -e "$f" ] || [ -e "$MAVEN_REPO/$f" ] || maven_die "$f does not exist: a recipe directory needs stage1.yaml ... stage4.yaml"
    maven_precheck "stage$n" "$f" "$@" || exit 2
done

dependency=()
for n in $(seq "$from" 4); do
    maven_sbatch_args "stage$n"
    jid=$(sbatch --parsable "${MAVEN_SBATCH_ARGS[@]}" "${dependency[@]}" "$MAVEN_REPO/slurm/stage$n.sh" \
        "$recipe_dir/stage$n.yaml" "$@") || maven_die "sbatch of stage$n failed"
    jid=${jid%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
    echo "stage$n $jid"
    dependency=(--dependency="afterok:$jid" --kill-on-invalid-dep=yes)
done
