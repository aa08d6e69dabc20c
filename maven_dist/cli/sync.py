"""``maven sync RUN_DIR [--uri URI]``: send every run record under RUN_DIR to its MLflow store.

Each stage and evaluation records its run on disk first (``metrics.jsonl`` and ``tracking/`` in its folder);
one that was killed, or ran while the store was down, has a record the store lacks. Sending twice duplicates
nothing. Exit codes: 0 all sent, 1 some record not sent (see the message), 2 RUN_DIR is not a directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter
from maven_dist.train.tracking.sync import sync_run_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maven sync", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (or a sweep's): every record under it")
    parser.add_argument("--uri", help="send to this store instead of the one each record names")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.exit(2, f"maven sync: error: run directory {args.run_dir} does not exist\n")
    done, values, failed = sync_run_dir(args.run_dir, uri=args.uri)
    print(f"synced {done} run records ({values} metric values new to the store)")
    for failure in failed:
        print(f"not sent: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
