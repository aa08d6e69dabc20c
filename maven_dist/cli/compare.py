"""Compare maven_dist stage runs in any MLflow store: final metrics and the params that differ.

maven compare --run-dir runs/tiny                      # the run directory's SQLite store
maven compare --uri http://mlflow:5000 --experiment maven-7b --stage stage4
maven compare --uri sqlite:///a.db --run RUN_ID --run RUN_ID --metrics loss/ perf/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.train.tracking.compare import find_runs, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maven compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uri", help="tracking URI (sqlite:///..., http://host:port, ...)")
    where.add_argument("--run-dir", help="a run directory; uses its sqlite:///RUN_DIR/mlflow.db")
    parser.add_argument(
        "--experiment", action="append", default=[], help="experiment name (repeatable; default all)"
    )
    parser.add_argument("--stage", action="append", default=[], help="only these stages (repeatable)")
    parser.add_argument("--launch", action="append", default=[], help="only these launch ids (repeatable)")
    parser.add_argument("--run", action="append", default=[], help="exactly these run ids (repeatable)")
    parser.add_argument("--metrics", nargs="*", default=[], help="only metrics starting with these prefixes")
    parser.add_argument(
        "--all-params", action="store_true", help="show every param, not only those that differ"
    )
    parser.add_argument("--width", type=int, default=24, help="column width (default 24)")
    args = parser.parse_args(argv)

    if args.run_dir:
        db = Path(args.run_dir).resolve() / "mlflow.db"
        if not db.is_file():
            parser.error(f"{db} does not exist; pass the run directory a stage ran in, or --uri")
        uri = f"sqlite:///{db}"
    else:
        uri = args.uri
    try:
        runs = find_runs(uri, args.experiment, args.stage, args.launch, args.run)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(runs, args.metrics, args.all_params, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
