# slurm/launch.sh - the launcher shared by slurm/stage1.sh ... stage4.sh and slurm/recipe.sh.
# Sourced, not run. A stage script calls `maven_stage_main STAGE "$@"`, which either
#
#   * submits the stage script itself with the settings of slurm/env.sh (outside a job:
#     `bash slurm/stage4.sh [RECIPE] [--set k=v ...]`), or
#   * runs the stage inside the job (`sbatch slurm/stage4.sh [RECIPE] [--set k=v ...]`):
#       1. checks the recipe, the world size against its tp*pp layout and the GPUs, in one process;
#       2. `srun`s one task per GPU (or MAVEN_CPU_TASKS_PER_NODE on CPU nodes); each task derives
#          RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from SLURM_* (python -m
#          maven_dist.launch.slurm_env) and execs `python -m maven_dist.train RECIPE ARGS`;
#       3. forwards USR2 (Slurm's warning before the time limit, --signal=B:USR2@120) to the tasks;
#          the trainer saves a checkpoint, rank 0 creates $MAVEN_REQUEUE_MARKER and the ranks exit with
#          REQUEUE_EXIT_CODE (75), which this script turns into `scontrol requeue $SLURM_JOB_ID`; the
#          requeued job resumes from that checkpoint.
#
# A rank that dies ends the step at once: `srun --kill-on-bad-exit=1` kills the other tasks when one exits
# non-zero (with 0 they sat in their next collective until its timeout, 30 minutes by torch's default; the
# trainer's own is 10, MAVEN_COLLECTIVE_TIMEOUT_S). The dead rank's traceback is the first error in the log
# (`--label` prefixes every line with its task number); srun's own "task N: Exited with exit code" follows.
# Because srun may then report another task's SIGKILL, a requeue after preemption is decided by the marker
# file rank 0 writes once the checkpoint is complete, not by srun's exit code alone.
#
# The recipe defaults to recipes/maven-7b/STAGE.yaml; a relative recipe path is looked up in the
# directory you submitted from, then in the repository.

MAVEN_REQUEUE_EXIT_CODE=75  # maven_dist.contract.preemption.REQUEUE_EXIT_CODE

maven_log() { printf '[maven %(%F %T)T] %s\n' -1 "$*" >&2; }
maven_die() { maven_log "error: $*"; exit "${2:-2}"; }

# The repository: MAVEN_REPO, else the directory of the submitted script (scontrol knows it: the
# script Slurm runs is a copy in its spool directory), else the submit directory.
maven_find_repo() {
    local cand cmd
    if [ -n "${MAVEN_REPO:-}" ]; then
        cand=$MAVEN_REPO
    elif [ -z "${SLURM_JOB_ID:-}" ]; then
        cand=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    else
        cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
        if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/launch.sh" ]; then
            cand=$(cd "$(dirname "$cmd")/.." && pwd)
        else
            cand=${SLURM_SUBMIT_DIR:-$PWD}
        fi
    fi
    [ -f "$cand/slurm/launch.sh" ] && [ -d "$cand/maven_dist" ] \
        || maven_die "cannot find the maven_dist repository (tried $cand): set MAVEN_REPO=/path/to/repo"
    MAVEN_REPO=$(cd "$cand" && pwd)
    export MAVEN_REPO
}

maven_load_env() {
    local f=${MAVEN_SLURM_ENV:-$MAVEN_REPO/slurm/env.sh}
    [ -f "$f" ] || f=$MAVEN_REPO/$f
    [ -f "$f" ] || maven_die "env file ${MAVEN_SLURM_ENV:-slurm/env.sh} not found; copy slurm/env.sh and set MAVEN_SLURM_ENV"
    MAVEN_SLURM_ENV=$(cd "$(dirname "$f")" && pwd)/$(basename "$f")
    export MAVEN_SLURM_ENV
    # shellcheck disable=SC1090
    source "$MAVEN_SLURM_ENV"
    if [ -z "${MAVEN_PYTHON:-}" ]; then
        if [ -x "$MAVEN_REPO/.venv/bin/python" ]; then MAVEN_PYTHON=$MAVEN_REPO/.venv/bin/python; else MAVEN_PYTHON=python3; fi
    fi
    # the package is importable from the repository even without `pip install -e .`
    export PYTHONPATH=$MAVEN_REPO${PYTHONPATH:+:$PYTHONPATH}
}

# maven_split_args STAGE ARGS...: MAVEN_RECIPE (first argument unless it is an option; default
# recipes/maven-7b/STAGE.yaml), MAVEN_ARGS (the rest, for the trainer, after the env file's run
# dir) and MAVEN_SETS (just the overrides, for the launch checks).
maven_split_args() {
    local stage=$1; shift
    MAVEN_RECIPE=recipes/maven-7b/$stage.yaml
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then MAVEN_RECIPE=$1; shift; fi
    if [ ! -e "$MAVEN_RECIPE" ] && [ -e "$MAVEN_REPO/$MAVEN_RECIPE" ]; then MAVEN_RECIPE=$MAVEN_REPO/$MAVEN_RECIPE; fi
    MAVEN_ARGS=()
    [ -n "${MAVEN_RUN_DIR:-}" ] && MAVEN_ARGS+=(--set "run_dir=$MAVEN_RUN_DIR")
    MAVEN_ARGS+=("$@")
    MAVEN_SETS=()
    local i=0 a
    local -a all=("${MAVEN_ARGS[@]}")
    while [ $i -lt ${#all[@]} ]; do
        a=${all[$i]}
        case "$a" in
            --set) MAVEN_SETS+=(--set "${all[$((i + 1))]:-}"); i=$((i + 1)) ;;
            --set=*) MAVEN_SETS+=(--set "${a#--set=}") ;;
        esac
        i=$((i + 1))
    done
}

# maven_sbatch_args STAGE: MAVEN_SBATCH_ARGS from the env file (what `bash slurm/stageN.sh` and
# slurm/recipe.sh pass to sbatch; a plain `sbatch` gets the SBATCH_* variables instead).
maven_sbatch_args() {
    local stage=$1 log_dir=${MAVEN_LOG_DIR:-$PWD/logs/slurm}
    mkdir -p "$log_dir"
    MAVEN_SBATCH_ARGS=(--job-name="maven-$stage" --nodes="${MAVEN_NODES:-1}" --cpus-per-task="${MAVEN_CPUS_PER_TASK:-1}"
        --output="$log_dir/%x-%j.out" --export="ALL,MAVEN_REPO=$MAVEN_REPO,MAVEN_SLURM_ENV=$MAVEN_SLURM_ENV")
    if [ "${MAVEN_GPUS_PER_NODE:-0}" -gt 0 ]; then
        MAVEN_SBATCH_ARGS+=(--gpus-per-node="$MAVEN_GPUS_PER_NODE" --ntasks-per-node="$MAVEN_GPUS_PER_NODE")
    else
        MAVEN_SBATCH_ARGS+=(--ntasks-per-node="${MAVEN_CPU_TASKS_PER_NODE:-1}")
    fi
    [ -n "${MAVEN_PARTITION:-}" ] && MAVEN_SBATCH_ARGS+=(--partition="$MAVEN_PARTITION")
    [ -n "${MAVEN_ACCOUNT:-}" ] && MAVEN_SBATCH_ARGS+=(--account="$MAVEN_ACCOUNT")
    [ -n "${MAVEN_QOS:-}" ] && MAVEN_SBATCH_ARGS+=(--qos="$MAVEN_QOS")
    [ -n "${MAVEN_TIME:-}" ] && MAVEN_SBATCH_ARGS+=(--time="$MAVEN_TIME")
    MAVEN_SBATCH_ARGS+=("${MAVEN_SBATCH_EXTRA[@]}")
}

# maven_precheck STAGE ARGS...: the launch checks on the submitting machine, with the GPUs the
# env file asks for taken as present (the login node usually has none).
maven_precheck() {
    local stage=$1; shift
    maven_split_args "$stage" "$@"
    local tasks=${MAVEN_CPU_TASKS_PER_NODE:-1} gpus=${MAVEN_GPUS_PER_NODE:-0}
    [ "$gpus" -gt 0 ] && tasks=$gpus
    "$MAVEN_PYTHON" -m maven_dist.launch.checks "$MAVEN_RECIPE" --nodes "${MAVEN_NODES:-1}" \
        --tasks-per-node "$tasks" --gpus-per-node "$gpus" --visible-gpus "$gpus" "${MAVEN_SETS[@]}" >/dev/null
}

# maven_submit STAGE SCRIPT ARGS...: sbatch SCRIPT with the env file's settings; prints the job id.
maven_submit() {
    local stage=$1 script=$2; shift 2
    maven_precheck "$stage" "$@" || exit 2
    maven_sbatch_args "$stage"
    sbatch --parsable "${MAVEN_SBATCH_ARGS[@]}" "$script" "$@"
}

# maven_run STAGE ARGS...: inside the job: check, srun the trainer, requeue on request.
maven_run() {
    local stage=$1; shift
    maven_split_args "$stage" "$@"
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local tasks=${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / nodes))}
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    local restarts=${SLURM_RESTART_COUNT:-0}
    maven_log "job ${SLURM_JOB_ID} ($stage, restart $restarts) on ${SLURM_JOB_NODELIST}: $nodes node(s) x $tasks task(s), $gpus GPU(s)/node; recipe $MAVEN_RECIPE ${MAVEN_ARGS[*]}"
    if [ "${MAVEN_GPUS_PER_NODE:-0}" -gt 0 ] && [ "$gpus" = 0 ]; then
        maven_die "$(basename "$MAVEN_SLURM_ENV") asks for $MAVEN_GPUS_PER_NODE GPU(s) per node but this job has none: submit with \`bash slurm/$stage.sh\` (reads the env file) or \`source slurm/env.sh\` before sbatch, or set MAVEN_GPUS_PER_NODE=0 for CPU nodes"
    fi
    "$MAVEN_PYTHON" -m maven_dist.launch.checks "$MAVEN_RECIPE" --nodes "$nodes" --tasks-per-node "$tasks" \
        --gpus-per-node "$gpus" "${MAVEN_SETS[@]}" || exit 2
    # A demo recipe (the tiny one) builds its assets once, here, before any rank starts.
    "$MAVEN_PYTHON" -m maven_dist.cli prepare-demo --if-enabled "$MAVEN_RECIPE" "${MAVEN_SETS[@]}" || exit 2

    export MAVEN_LAUNCHER=sbatch MAVEN_REQUEUE_COUNT=$restarts
    # Rank 0 runs on this (the batch) node: it creates the marker once a preemption checkpoint is complete.
    export MAVEN_REQUEUE_MARKER=${TMPDIR:-/tmp}/maven-requeue-${SLURM_JOB_ID}.${restarts}
    rm -f "$MAVEN_REQUEUE_MARKER"
    # MAVEN_TRAIN_CMD: what each task runs (default the trainer; the launcher's own plumbing test
    # swaps in a stand-in). Split on spaces.
    local -a train_cmd
    read -ra train_cmd <<<"${MAVEN_TRAIN_CMD:-$MAVEN_PYTHON -m maven_dist.train}"
    local srun_pid="" usr2=0 term=0
    # --signal=B:USR2@120 reaches this shell only: pass it on; srun relays it to every task.
    trap 'usr2=1; maven_log "USR2: asking the trainer to save and stop"; [ -n "$srun_pid" ] && kill -USR2 "$srun_pid" 2>/dev/null' USR2
    # scancel / scontrol requeue send TERM to every process of the job themselves.
    trap 'term=1; maven_log "TERM: the job is being cancelled or requeued by Slurm"' TERM
    srun --nodes="$nodes" --ntasks-per-node="$tasks" --kill-on-bad-exit=1 --label \
        "$MAVEN_PYTHON" -m maven_dist.launch.slurm_env -- \
        "${train_cmd[@]}" "$MAVEN_RECIPE" "${MAVEN_ARGS[@]}" &
    srun_pid=$!
    local rc again
    while :; do  # `wait` returns early (status > 128) when a trapped signal arrives
        wait "$srun_pid"; rc=$?
        [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null && continue
        break
    done
    wait "$srun_pid" 2>/dev/null; again=$?  # srun's own status if the last wait was interrupted
    [ "$again" -ne 127 ] && rc=$again
    if [ -e "$MAVEN_REQUEUE_MARKER" ]; then
        rm -f "$MAVEN_REQUEUE_MARKER"
        rc=$MAVEN_REQUEUE_EXIT_CODE  # the checkpoint is complete, whichever task srun reported last
    fi
    if [ "$rc" = "$MAVEN_REQUEUE_EXIT_CODE" ]; then
        if [ "$term" = 1 ] && [ "$usr2" = 0 ]; then
            maven_log "trainer saved after TERM; Slurm decides what happens to job $SLURM_JOB_ID"
            exit "$rc"
        fi
        if [ "$restarts" -ge "${MAVEN_MAX_REQUEUES:-50}" ]; then
            maven_die "trainer asked for a requeue but job $SLURM_JOB_ID already restarted $restarts times (MAVEN_MAX_REQUEUES)" 1
        fi
        maven_log "trainer saved a checkpoint and asked to be requeued: scontrol requeue $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || maven_die "scontrol requeue $SLURM_JOB_ID failed" 1
        exit 0
    fi
    if [ "$rc" = 0 ]; then
        maven_log "$stage finished"
    else
        maven_log "$stage failed with exit code $rc: the first task's traceback above (lines prefixed 'N:') is the cause; srun killed the other tasks (--kill-on-bad-exit=1)"
    fi
    exit "$rc"
}

maven_stage_main() {
    local stage=$1; shift
    maven_find_repo
    maven_load_env
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        local script
        script=$MAVEN_REPO/slurm/$stage.sh
        local jid
        jid=$(maven_submit "$stage" "$script" "$@") || exit $?
        maven_log "submitted $stage as job $jid (log: ${MAVEN_LOG_DIR:-$PWD/logs/slurm}/maven-$stage-$jid.out)"
        echo "$jid"
    else
        maven_run "$stage" "$@"
    fi
}
