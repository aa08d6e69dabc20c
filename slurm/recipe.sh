#!/usr/bin/env bash
# slurm/recipe.sh - submit the four stages of a recipe, each waiting for the previous one to succeed.
#
#   slurm/recipe.sh [RECIPE_DIR] [--from stageN] [--set key=value ...]
#
# RECIPE_DIR (default recipes/maven-7b) holds stage1.yaml ... stage4.yaml. The stages run in the order
# their init_from hand-offs imply (`maven pipeline RECIPE_DIR --print-order`; the MaVEn recipes: stage2,
# stage1, stage3, stage4). Each stage is submitted with --dependency=afterok on the one before it, so a
# failed stage stops the chain (Slurm cancels the later jobs: --kill-on-invalid-dep=yes). A stage that
# is preempted and requeued keeps its job id, and the chain waits for it. --from stageN skips the
# stages before it in that order (they already ran into the same run_dir). The --set overrides go to every stage; give them a
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
from=""
if [ "${1:-}" = --from ]; then
    from=$2
    shift 2
    [[ "$from" =~ ^stage[1-4]$ ]] || maven_die "--from takes stage1 ... stage4"
fi
[ -d "$recipe_dir" ] || [ -d "$MAVEN_REPO/$recipe_dir" ] || maven_die "recipe directory $recipe_dir does not exist; recipes live under recipes/ (e.g. recipes/tiny)"
[ -d "$recipe_dir" ] || recipe_dir=$MAVEN_REPO/$recipe_dir
for n in 1 2 3 4; do
    [ -e "$recipe_dir/stage$n.yaml" ] || maven_die "$recipe_dir/stage$n.yaml does not exist: a recipe directory needs stage1.yaml ... stage4.yaml"
done
order=$("$MAVEN_PYTHON" -m maven_dist.pipeline "$recipe_dir" --print-order "$@") || exit 2
stages=()
for stage in $order; do
    [ -n "$from" ] && [ "$stage" != "$from" ] && [ ${#stages[@]} -eq 0 ] && continue
    stages+=("$stage")
done
[ ${#stages[@]} -gt 0 ] || maven_die "--from $from: no such stage in the order $order"

# Check every stage before submitting any: a typo in stage 4 should not surface hours later.
for stage in "${stages[@]}"; do
    maven_precheck "$stage" "$recipe_dir/$stage.yaml" "$@" || exit 2
done

dependency=()
for stage in "${stages[@]}"; do
    maven_sbatch_args "$stage"
    jid=$(sbatch --parsable "${MAVEN_SBATCH_ARGS[@]}" "${dependency[@]}" "$MAVEN_REPO/slurm/$stage.sh" \
        "$recipe_dir/$stage.yaml" "$@") || maven_die "sbatch of $stage failed"
    jid=${jid%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
    echo "$stage $jid"
    dependency=(--dependency="afterok:$jid" --kill-on-invalid-dep=yes)
done
