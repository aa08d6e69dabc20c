# slurm/tool_array.sh - the launcher shared by slurm/labels_array.sh and slurm/tokenize_array.sh.
# Sourced (it sources slurm/launch.sh beside it), not run. A script calls
# `maven_array_main TOOL NEEDS_GPU "$@"` (TOOL: labels or tokenize; NEEDS_GPU: 1 when the tool's models
# want a GPU), which prints the script's usage for -h/--help or no arguments, or else either
#
#   * submits the script itself as a job array of --num-shards tasks with the settings of
#     slurm/env.sh (outside a job: `bash slurm/labels_array.sh ... --num-shards N`), after checking
#     the arguments and inputs here (`maven TOOL ... --dry-run`), so a typo fails before anything is
#     queued; or
#   * runs task I of the array (inside the job): `maven TOOL ARGS --num-shards N --shard-index I`,
#     N from the arguments or else the array's size, I = SLURM_ARRAY_TASK_ID.
#
# The tools take their part from these flags only, never from SLURM_* themselves: a `maven tokenize`
# that happens to run inside some other array job (a sweep's arms) still does all of its work.

# shellcheck source=slurm/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

# maven_array_option NAME ARGS...: the value of --NAME in ARGS (--NAME V or --NAME=V), empty if absent.
maven_array_option() {
    local name=$1; shift
    while [ $# -gt 0 ]; do
        case "$1" in
            "--$name") echo "${2:-}"; return ;;
            "--$name="*) echo "${1#*=}"; return ;;
        esac
        shift
    done
}

# maven_array_usage SCRIPT: the comment block at the top of SCRIPT.
maven_array_usage() {
    sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "$1"
}

# maven_array_sbatch_args TOOL COUNT NEEDS_GPU: MAVEN_SBATCH_ARGS for an array of COUNT one-process
# tasks, from the env file (its partition, account, QOS, time, CPUs per task and extra options; one
# GPU per task when it asks for GPUs and the tool needs one).
maven_array_sbatch_args() {
    local tool=$1 count=$2 needs_gpu=$3 log_dir=${MAVEN_LOG_DIR:-$PWD/logs/slurm}
    mkdir -p "$log_dir"
    local range="0-$((count - 1))${MAVEN_ARRAY_MAX_RUNNING:+%$MAVEN_ARRAY_MAX_RUNNING}"
    MAVEN_SBATCH_ARGS=(--job-name="maven-$tool" --array="$range" --nodes=1 --ntasks=1
        --cpus-per-task="${MAVEN_CPUS_PER_TASK:-1}" --output="$log_dir/%x-%A_%a.out"
        --export="ALL,MAVEN_REPO=$MAVEN_REPO,MAVEN_SLURM_ENV=$MAVEN_SLURM_ENV")
    if [ "$needs_gpu" = 1 ] && [ "${MAVEN_GPUS_PER_NODE:-0}" -gt 0 ]; then
        MAVEN_SBATCH_ARGS+=(--gpus-per-node=1)
    fi
    [ -n "${MAVEN_PARTITION:-}" ] && MAVEN_SBATCH_ARGS+=(--partition="$MAVEN_PARTITION")
    [ -n "${MAVEN_ACCOUNT:-}" ] && MAVEN_SBATCH_ARGS+=(--account="$MAVEN_ACCOUNT")
    [ -n "${MAVEN_QOS:-}" ] && MAVEN_SBATCH_ARGS+=(--qos="$MAVEN_QOS")
    [ -n "${MAVEN_TIME:-}" ] && MAVEN_SBATCH_ARGS+=(--time="$MAVEN_TIME")
    MAVEN_SBATCH_ARGS+=("${MAVEN_SBATCH_EXTRA[@]}")
}

# maven_array_submit TOOL NEEDS_GPU SCRIPT ARGS...: check, then sbatch SCRIPT as an array; prints the job id.
maven_array_submit() {
    local tool=$1 needs_gpu=$2 script=$3; shift 3
    local count
    count=$(maven_array_option num-shards "$@")
    [ -n "$count" ] || maven_die "say how many array tasks to split the work into: add --num-shards N"
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || maven_die "--num-shards $count: give the number of array tasks, 1 or more"
    [ -z "$(maven_array_option shard-index "$@")" ] \
        || maven_die "--shard-index comes from each array task's id: leave it out"
    "$MAVEN_PYTHON" -m maven_dist.cli "$tool" "$@" --shard-index 0 --dry-run >/dev/null || exit $?
    maven_array_sbatch_args "$tool" "$count" "$needs_gpu"
    sbatch --parsable "${MAVEN_SBATCH_ARGS[@]}" "$script" "$@"
}

# maven_array_run TOOL NEEDS_GPU ARGS...: inside the job: this task's part of the work.
maven_array_run() {
    local tool=$1 needs_gpu=$2; shift 2
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || maven_die "job $SLURM_JOB_ID is not an array job: submit it with \`bash slurm/${tool}_array.sh ... --num-shards N\` or \`sbatch --array=0-<N-1> slurm/${tool}_array.sh ...\`"
    [ -z "$(maven_array_option shard-index "$@")" ] \
        || maven_die "--shard-index comes from the array task id ($SLURM_ARRAY_TASK_ID): leave it out"
    local -a split=()
    if [ -z "$(maven_array_option num-shards "$@")" ]; then
        # The array is the split: its task ids must be exactly 0 .. COUNT-1.
        local min=${SLURM_ARRAY_TASK_MIN:-0} max=${SLURM_ARRAY_TASK_MAX:-0} count=${SLURM_ARRAY_TASK_COUNT:-1}
        if [ "$min" != 0 ] || [ $((max - min + 1)) != "$count" ]; then
            maven_die "array ids $min..$max ($count tasks) are not 0..$((count - 1)): submit with --array=0-$((count - 1)), or give --num-shards N with ids below N"
        fi
        split=(--num-shards "$count")
    fi
    split+=(--shard-index "$SLURM_ARRAY_TASK_ID")
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    if [ "$needs_gpu" = 1 ] && [ "${MAVEN_GPUS_PER_NODE:-0}" -gt 0 ] && [ "$gpus" = 0 ]; then
        maven_die "$(basename "$MAVEN_SLURM_ENV") asks for GPUs but array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} has none: submit with \`bash slurm/${tool}_array.sh\`, or sbatch with --gpus-per-node=1"
    fi
    [ "$gpus" -gt 1 ] && maven_log "warning: this task has $gpus GPUs and uses one; \`bash slurm/${tool}_array.sh\` asks for one per task"
    maven_log "array task ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURMD_NODENAME:-$(hostname)}: maven $tool $* ${split[*]}"
    exec "$MAVEN_PYTHON" -m maven_dist.cli "$tool" "$@" "${split[@]}"
}

maven_array_main() {
    local tool=$1 needs_gpu=$2; shift 2
    maven_find_repo
    local script="$MAVEN_REPO/slurm/${tool}_array.sh"
    case "${1:-}" in
        -h | --help) maven_array_usage "$script"; exit 0 ;;
        "") maven_array_usage "$script" >&2; exit 2 ;;
    esac
    maven_load_env
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        maven_array_run "$tool" "$needs_gpu" "$@"
    fi
    local jid
    jid=$(maven_array_submit "$tool" "$needs_gpu" "$script" "$@") || exit $?
    maven_log "submitted maven $tool as array job $jid (logs: ${MAVEN_LOG_DIR:-$PWD/logs/slurm}/maven-$tool-${jid}_<task>.out)"
    echo "$jid"
}
