"""``python -m maven_dist.launch RECIPE --nodes N --gpus-per-node G [--partition P] [--local]``.

Submits one stage through submitit: to Slurm by default, or with ``--local`` to submitit's local
executor (the same :class:`~maven_dist.launch.stage_job.StageJob` callable, processes on this
machine). The launch checks run first, here, so a bad recipe or layout fails before anything is
queued. Prints the job id and the submitit folder (logs: ``FOLDER/JOBID_0_log.out``); waits for
the result with ``--wait`` (always with ``--local``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit

from maven_dist.contract.command_line import HelpFormatter, add_overrides_option
from maven_dist.launch.checks import LaunchError, Layout, check_launch, visible_gpu_count
from maven_dist.launch.stage_job import StageJob

# submitit treats a USR2 as a time-out, not a preemption, when timeout_min <= 10 (it then stops
# requeueing after max_num_timeout); a stage job never asks for that little.
MIN_TIMEOUT_MIN = 11


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maven launch", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument("recipe", help="stage recipe, e.g. recipes/maven-7b/stage4.yaml")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node = tasks per node; 0 = CPU")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node, or 1 on CPU")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: 10 per GPU task, 1 on CPU")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default=None, help="Slurm account (default: your default account)")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit of the job in minutes")
    p.add_argument("--folder", default=None, help="submitit folder; default RUN_DIR/submitit")
    p.add_argument("--local", action="store_true", help="run on this machine with submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    p.add_argument(
        "--check",
        action="store_true",
        help="only check (RECIPE may be a recipe directory: every stage), submit nothing",
    )
    add_overrides_option(p)
    return p


def build_executor(
    args: argparse.Namespace, layout: Layout, folder: Path, job_name: str
) -> submitit.Executor:
    """A submitit executor for the layout: Slurm (signal 120 s before the limit, requeue allowed) or local."""
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if args.local else "slurm")
    cpus = args.cpus_per_task or (10 if layout.gpus_per_node else 1)
    executor.update_parameters(
        name=job_name,
        nodes=layout.nodes,
        tasks_per_node=layout.tasks_per_node,
        gpus_per_node=layout.gpus_per_node,
        cpus_per_task=cpus,
        timeout_min=max(args.timeout_min, MIN_TIMEOUT_MIN),
    )
    if not args.local:
        extra: dict[str, object] = {"requeue": True}
        if args.account:
            extra["account"] = args.account
        executor.update_parameters(slurm_signal_delay_s=120, slurm_additional_parameters=extra)
        if args.partition:
            executor.update_parameters(slurm_partition=args.partition)
    return executor


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = args.tasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    layout = Layout(args.nodes, tasks, args.gpus_per_node)
    if args.check:
        return _check_only(args, layout)
    try:
        if args.local and layout.nodes != 1:
            raise LaunchError(f"--local runs on this machine only: --nodes {layout.nodes} must be 1")
        # Locally the GPUs are counted here; for Slurm the compute nodes have them, not this one.
        visible = visible_gpu_count() if args.local and layout.gpus_per_node else layout.gpus_per_node
        cfg = check_launch(args.recipe, args.overrides, layout, visible_gpus=visible)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.demo.enabled:  # the tiny recipe: its assets are built once here, before any task starts
        from maven_dist.offline.demo import prepare_demo

        prepare_demo(cfg)
    folder = Path(args.folder) if args.folder else Path(cfg.run_dir) / "submitit"
    executor = build_executor(args, layout, folder, job_name=f"maven-{cfg.stage.name}")
    job = executor.submit(StageJob(args.recipe, list(args.overrides)))
    where = "locally" if args.local else "to Slurm"
    print(f"submitted {cfg.stage.name} {where}: job {job.job_id}, folder {folder}", flush=True)
    if not (args.wait or args.local):
        return 0
    try:
        job.results()
    except Exception as exc:  # submitit re-raises the task's error with its traceback
        print(f"error: job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished {cfg.stage.name}", flush=True)
    return 0


def _check_only(args: argparse.Namespace, layout: Layout) -> int:
    """``--check``: the launch checks of the stage (or of every stage of a recipe directory)."""
    recipe = Path(args.recipe)
    recipes = sorted(recipe.glob("stage[1-4].yaml")) if recipe.is_dir() else [recipe]
    failed = 0
    for path in recipes or [recipe]:
        try:
            cfg = check_launch(path, args.overrides, layout, visible_gpus=layout.gpus_per_node)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok: {path} ({cfg.stage.name}) on {layout.describe()}", flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
