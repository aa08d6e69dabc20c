"""``maven sync RUN_DIR [--uri URI]`` (also ``python -m maven_dist.train.tracking sync ...``): deliver a run
directory's spooled tracking data to its store.

A stage that ended while the tracking server was unreachable leaves what it could not send in
``RUN_DIR/mlflow_spool/*.jsonl``; the next stage replays it, and this command does it by hand.

Exit codes: 0 everything delivered (or nothing to deliver), 2 RUN_DIR is not a directory, 1 some spool
file stays undelivered (its store is still unreachable, or the file cannot be read: see the message).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter

from .sync import sync_spool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven sync", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("run_dir", help="the run directory whose mlflow_spool/ to replay")
    parser.add_argument(
        "--uri", default=None, help="replay into this store instead of the one each file names"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sync"]:  # the older spelling, python -m maven_dist.train.tracking sync RUN_DIR
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"maven sync: error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = sync_spool(args.run_dir, uri=args.uri)
    print(f"delivered {result.files} spool files: {result.ops} ops, {result.metrics} metric values")
    for failure in result.failed:
        print(f"not delivered: {failure}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
