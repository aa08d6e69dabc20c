"""`maven train RECIPE [--set key=value ...] [--force]`: run one stage (also `python -m maven_dist.train`).

Under torchrun (or the Slurm launcher) every rank runs this; a plain `python` run is one process.
Exit codes: 0 done, 2 a bad recipe or missing input (the message says what to fix), 75 saved after a
preemption signal (requeue me), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from maven_dist.contract.command_line import HelpFormatter, add_overrides_option
from maven_dist.entry_point import prepare_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven train", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/stage4.yaml")
    add_overrides_option(parser)
    parser.add_argument(
        "--force", action="store_true", help="resume even from a checkpoint written by a different recipe"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)

    from maven_dist.config import ConfigError, load_config
    from maven_dist.data.formats import DataError
    from maven_dist.parallel.distributed import destroy, print0
    from maven_dist.parallel.engine import LayoutMismatch
    from maven_dist.train.checkpoint import CheckpointMismatch
    from maven_dist.train.trainer import run_stage

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_stage(cfg, force=args.force)
    except (ConfigError, DataError, FileNotFoundError, CheckpointMismatch, LayoutMismatch) as exc:
        # Input the user can fix: the message says what; a traceback would bury it.
        print(f"error: [{cfg.stage.name}] {exc}", file=sys.stderr)
        return 2
    finally:
        destroy()
    print0(
        f"[{cfg.stage.name}] done: {result.steps} steps, final loss {result.final_loss:.4f}, export {result.export_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
