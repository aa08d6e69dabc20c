"""``python -m maven_dist.train.tracking sync RUN_DIR [--uri URI]``: replay the tracking spool."""

from __future__ import annotations

import argparse
import logging
import sys

from .sync import sync_spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maven_dist.train.tracking", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="deliver {RUN_DIR}/mlflow_spool/*.jsonl to the tracking store")
    sync.add_argument("run_dir", help="the run directory whose mlflow_spool/ to replay")
    sync.add_argument("--uri", default=None, help="replay into this store instead of the one each file names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = sync_spool(args.run_dir, uri=args.uri)
    print(f"delivered {result.files} spool files: {result.ops} ops, {result.metrics} metric values")
    for failure in result.failed:
        print(f"not delivered: {failure}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
