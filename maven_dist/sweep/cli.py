"""``maven sweep SWEEP.yaml [--out DIR] [--nproc N] [--arms a,b] [--slurm ...] [--report-only]``.

Runs a sweep (maven_dist/sweep/spec.py says what the file holds; docs/experiments.md how to use it): the
shared stages once, then every arm's stages as a ``maven pipeline`` into one MLflow store, then the
comparison report (``OUT/report/``: HTML with the curves embedded, Markdown, CSV, PNGs), also logged to
the sweep's MLflow run. On this machine the arms run one after the other; with ``--slurm`` they are a
submitit job array (``--report-only`` writes the report once the jobs are done). Rerunning the same
command finishes only what is missing, into the same MLflow runs.

Exit codes: 0 done (or submitted), 2 a sweep file or recipe that cannot be used, else the failing arm's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maven sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("sweep", type=Path, help="sweep file, e.g. recipes/ablations/tiny-keep-ratio.yaml")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default: runs/sweeps/NAME)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per stage on this machine (local runs)")
    p.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only write and log the comparison report")
    slurm = p.add_argument_group("Slurm (submitit job array; one node per arm)")
    slurm.add_argument(
        "--slurm", action="store_true", help="submit the arms to Slurm instead of running them"
    )
    slurm.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per arm (= ranks per stage); 0: CPU, --nproc ranks"
    )
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--account", default=None, help="Slurm account")
    slurm.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit per arm job")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="default: 10 per GPU, or 1 per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maven_dist.config import ConfigError
    from maven_dist.sweep.runner import plan_jobs, run_local, tracking_uri
    from maven_dist.sweep.spec import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep)
        root = (args.out or Path("runs") / "sweeps" / sweep.name).resolve()
        on_gpus = args.slurm and args.gpus_per_node > 0
        shared, arms = plan_jobs(sweep, root, args.gpus_per_node if on_gpus else args.nproc)
        wanted = [a for a in args.arms.split(",") if a]
        if wanted:
            arms = [job for job in arms if job.arm in {sweep.arm(a).name for a in wanted}]
    except (SweepError, ConfigError) as exc:
        print(f"maven sweep: error: {exc}", file=sys.stderr)
        return 2
    jobs = ([shared] if shared else []) + arms
    print(
        f"[sweep] {sweep.name}: {len(arms)} arms into {root} (store {tracking_uri(sweep, root)})", flush=True
    )
    if args.dry_run:
        for job in jobs:
            print(f"{job.arm}: {' '.join(job.command)}")
        return 0
    if args.slurm and not args.report_only:
        from maven_dist.sweep.slurm import submit

        cpus = args.cpus_per_task or (10 * args.gpus_per_node if args.gpus_per_node > 0 else args.nproc)
        ids = submit(shared, arms, root / "submitit", args.gpus_per_node, args.partition, args.account,
                     args.timeout_min, cpus)  # fmt: skip
        print(f"[sweep] submitted {' '.join(ids) or 'nothing (all finished)'}; when they are done: "
              f"maven sweep {args.sweep} --out {root} --report-only")  # fmt: skip
        return 0
    if not args.report_only:
        root.mkdir(parents=True, exist_ok=True)
        code = run_local(jobs)
        if code != 0:
            return code
    from maven_dist.sweep.report import report_sweep

    report_sweep(sweep, root)
    return 0
