"""``maven sync RUN_DIR [--uri URI]`` (also ``python -m maven_dist.train.tracking sync ...``): deliver a run
directory's spooled tracking data to its store.

A stage that ended while the tracking server was unreachable leaves what it could not send in
``RUN_DIR/mlflow_spool/*.jsonl``; the next stage replays it, and this command does it by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .sync import sync_spool


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sync"]:  # the older spelling, python -m maven_dist.train.tracking sync RUN_DIR
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="maven sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory whose mlflow_spool/ to replay")
    parser.add_argument(
        "--uri", default=None, help="replay into this store instead of the one each file names"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = sync_spool(args.run_dir, uri=args.uri)
    print(f"delivered {result.files} spool files: {result.ops} ops, {result.metrics} metric values")
    for failure in result.failed:
        print(f"not delivered: {failure}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
