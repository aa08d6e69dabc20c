"""`maven pipeline RECIPE_DIR [--nproc N] [--stages ...] [--set key=value ...]`: a recipe's stages in order.

Also ``python -m maven_dist.pipeline``. The stages run in the order their ``stage.init_from`` hand-offs
imply (a stage runs after the stage it starts from), each as its own ``torchrun`` (one process per
rank). All stages share one MLflow parent run: the launch id of the run directory
(``RUN_DIR/launch_id``, or ``$MAVEN_LAUNCH_ID``), so rerunning the same command, to resume or after it
finished, continues the same parent and stage runs (``--new-launch`` starts new ones). A stage that already
finished with the same recipe (``RUN_DIR/stageN/finished.json``) is skipped. Demo assets (recipes with
``demo.enabled``, the tiny recipe) are prepared once here, before any rank starts; a recipe with
``eval.enabled`` ends with ``maven eval`` on the last stage's export, logged under the same parent run.
At the end the parent run gets the recipe's name, its params and every stage's final metrics.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from maven_dist.config import STAGE_NAMES
from maven_dist.contract.command_line import HelpFormatter, add_overrides_option
from maven_dist.entry_point import prepare_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven pipeline", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("recipe_dir", help="directory with stage1.yaml .. stage4.yaml, e.g. recipes/tiny")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per stage (torchrun --nproc_per_node)")
    parser.add_argument(
        "--stages",
        default=",".join(STAGE_NAMES),
        help="comma-separated subset, e.g. stage3,stage4",
    )
    parser.add_argument(
        "--print-order", action="store_true", help="print the stages in the order they run, and exit"
    )
    parser.add_argument(
        "--new-launch", action="store_true", help="start new MLflow parent and stage runs for this run_dir"
    )
    parser.add_argument(
        "--stage-set",
        dest="stage_overrides",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="override a value in one stage's recipe only, e.g. stage4:stage.init_from=/x/export (repeatable)",
    )
    add_overrides_option(parser, "override a value in every stage's recipe")
    return parser


def stage_overrides(items: list[str]) -> dict[str, list[str]]:
    """``STAGE:KEY=VALUE`` items as {stage: [KEY=VALUE, ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or not stage or "=" not in override:
            raise ValueError(f"--stage-set {item!r} is not of the form STAGE:KEY=VALUE (e.g. stage4:seed=1)")
        out.setdefault(stage, []).append(override)
    return out


def stage_order(configs: dict[str, object]) -> list[str]:
    """The stages of `configs` ({name: Config}) so that each runs after the stage its ``init_from`` names
    (when that stage is in the run); ties keep the paper's numbering."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stage.init_from forms a cycle through {sorted(visiting)}")
        visiting.add(name)
        parent = configs[name].stage.init_from
        if parent in configs:
            visit(parent)
        visiting.discard(name)
        order.append(name)

    for name in sorted(configs):
        visit(name)
    return order


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)

    from maven_dist.config import ConfigError, load_config
    from maven_dist.offline.demo import prepare_demo

    recipe_dir = Path(args.recipe_dir)
    try:
        per_stage = stage_overrides(args.stage_overrides)
        configs = {
            s: load_config(recipe_dir / f"{s}.yaml", args.overrides + per_stage.get(s, []))
            for s in args.stages.split(",")
        }
        unknown = sorted(set(per_stage) - set(configs))
        if unknown:
            raise ValueError(f"--stage-set names stages that do not run: {unknown}")
        order = stage_order(configs)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_order:
        print(" ".join(order))
        return 0
    first = configs[order[0]]
    if first.demo.enabled:
        prepare_demo(first)

    from maven_dist.contract.checkpoint_layout import finished_fingerprint
    from maven_dist.train.tracking import resolve_tracking_uri
    from maven_dist.train.tracking.run_info import (
        LAUNCH_ID_ENV,
        RUN_NAME_ENV,
        new_launch_id,
        resolve_launch_id,
    )

    run_dir = Path(first.run_dir)
    launch_id = new_launch_id(run_dir) if args.new_launch else resolve_launch_id(run_dir)
    env = os.environ | {LAUNCH_ID_ENV: launch_id}
    env.setdefault(RUN_NAME_ENV, recipe_dir.name)
    print(f"[pipeline] stage order: {' -> '.join(order)}; launch {launch_id}", flush=True)
    for name in order:
        cfg = configs[name]
        if finished_fingerprint(cfg.stage_dir) == cfg.fingerprint():
            print(
                f"[pipeline] {name} already finished with this recipe ({cfg.stage_dir}); skipped", flush=True
            )
            continue
        recipe = recipe_dir / f"{name}.yaml"
        sets = args.overrides + per_stage.get(name, [])
        train = ["-m", "maven_dist.train", str(recipe), *(f"--set={o}" for o in sets)]
        cmd = [sys.executable, *train]
        if args.nproc > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
            cmd = [sys.executable, *torchrun, *train]
        print(f"[pipeline] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        if code != 0:
            print(
                f"[pipeline] {name} failed with exit code {code}; rerun the same command to resume "
                "(each stage continues from its latest checkpoint)",
                file=sys.stderr,
            )
            return code
        print(f"[pipeline] {name} finished in {time.perf_counter() - start:.0f} s", flush=True)
    last = configs[order[-1]]
    if last.eval.enabled:
        code = _evaluate(last, args.nproc, env)
        if code != 0:
            return code
    if last.tracking.enabled:
        _sync_records(last.run_dir)
        _summarise(last, env[LAUNCH_ID_ENV], env[RUN_NAME_ENV], str(recipe_dir), order)
    print(f"[pipeline] all stages done; MLflow store: {resolve_tracking_uri(last)}")
    return 0


def _evaluate(cfg, nproc: int, env: dict) -> int:
    """`maven eval` on the last stage's export, logged into the launch's parent run (recipe's `eval:`)."""
    from maven_dist.train.tracking import resolve_tracking_uri

    export = cfg.stage_dir / "export"
    e = cfg.eval
    args = [str(export), "--out", str(Path(cfg.run_dir) / "eval" / cfg.stage.name), "--run-dir", cfg.run_dir]
    args += ["--batch-size", str(e.batch_size), "--max-new-tokens", str(e.max_new_tokens)]
    args += ["--tracking-uri", resolve_tracking_uri(cfg), "--experiment", cfg.tracking.experiment]
    if e.tasks:
        args += ["--tasks", ",".join(e.tasks)]
    if e.controls:
        args += ["--control", ",".join(e.controls)]
    if e.data:
        args += ["--data", str(cfg.resolve_path(e.data))]
    if not cfg.tracking.enabled:
        args.append("--no-tracking")
    cmd = [sys.executable, "-m", "maven_dist.cli", "eval", *args]
    if nproc > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [sys.executable, *torchrun, "-m", "maven_dist.cli", "eval", *args]
    print(f"[pipeline] eval: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(
            f"[pipeline] eval failed with exit code {code}; rerun the same command to finish it",
            file=sys.stderr,
        )
    else:
        print(f"[pipeline] eval finished in {time.perf_counter() - start:.0f} s", flush=True)
    return code


def _summarise(cfg, launch_id: str, name: str, recipe: str, order: list[str]) -> None:
    """The parent run's name, params and results (train/tracking/report.py); never fails the run."""
    from maven_dist.train.tracking import resolve_tracking_uri
    from maven_dist.train.tracking.report import summarise_launch

    try:
        uri, experiment = resolve_tracking_uri(cfg), cfg.tracking.experiment
        summarise_launch(uri, experiment, launch_id, name, cfg.to_dict(), recipe, order)
    except Exception as exc:  # noqa: BLE001 - the summary is a convenience; the runs hold everything
        print(f"[pipeline] warning: parent run not summarised ({type(exc).__name__}: {exc})", file=sys.stderr)


def _sync_records(run_dir: str) -> None:
    """The last stage (or the evaluation) may have ended while the tracking server was down: its record waits
    in the run directory (each earlier one was sent by the next stage). Try once more; never fail for it."""
    from maven_dist.train.tracking.sync import sync_run_dir

    done, values, failed = sync_run_dir(run_dir)
    if failed:
        print(
            f"[pipeline] {len(failed)} tracking record(s) not sent yet ({failed[0]}); later run: maven sync {run_dir}"
        )
    elif values:
        print(f"[pipeline] sent {values} more metric values of {done} run records to the tracking store")


if __name__ == "__main__":
    sys.exit(main())
