"""Compare maven_dist launches (arms) across MLflow stores: one row per arm with the params that differ,
val/loss, eval scores, visual positions per image and tokens/s; optionally as Markdown, CSV, HTML and plots.

maven compare --run-dir runs/a --run-dir runs/b        # two run directories' SQLite stores, merged
maven compare --uri http://mlflow:5000 --sweep keep-ratio --html report.html --plots plots/
maven compare --uri http://mlflow:5000 --run-dir runs/local --experiment maven-7b --stage stage4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter
from maven_dist.train.tracking.report import (
    HISTORY_KEYS,
    build_report,
    find_runs_in_stores,
    group_arms,
    load_histories,
    render_plots,
    to_csv,
    to_html,
    to_markdown,
    to_text,
    write_plots,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maven compare", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--uri",
        action="append",
        default=[],
        help="tracking URI (sqlite:///..., http://host:port; repeatable)",
    )
    parser.add_argument(
        "--run-dir", action="append", default=[], help="a run directory: its RUN_DIR/mlflow.db (repeatable)"
    )
    parser.add_argument(
        "--experiment", action="append", default=[], help="experiment name (repeatable; default all)"
    )
    parser.add_argument(
        "--stage",
        action="append",
        default=[],
        help="only these stages (repeatable); eval-* runs stay unless one is named",
    )
    parser.add_argument("--launch", action="append", default=[], help="only these launch ids (repeatable)")
    parser.add_argument("--sweep", help="only the launches tagged maven.sweep=SWEEP")
    parser.add_argument(
        "--all-params", action="store_true", help="show every param, not only those that differ"
    )
    parser.add_argument("--width", type=int, default=24, help="terminal column width")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the report as Markdown")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="write the report as CSV (one row per arm)")
    parser.add_argument(
        "--html", type=Path, metavar="FILE", help="write a self-contained HTML page with plots"
    )
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write the loss/val-loss PNGs per stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    uris = list(args.uri)
    for run_dir in args.run_dir:
        db = Path(run_dir).resolve() / "mlflow.db"
        if not db.is_file():
            parser.error(f"{db} does not exist; pass the run directory a stage ran in, or --uri")
        uris.append(f"sqlite:///{db}")
    if not uris:
        parser.error("give a store: --run-dir RUN_DIR or --uri URI (both repeatable)")
    try:
        runs = find_runs_in_stores(uris, args.experiment, args.stage, args.launch, sweep=args.sweep)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_histories(runs, HISTORY_KEYS)
    arms = group_arms(runs)
    report = build_report(arms, args.all_params)
    print(to_text(report, args.width))

    images = render_plots(arms) if args.plots or args.html else {}
    plots = write_plots(images, args.plots) if args.plots else []
    if args.markdown:
        # The Markdown file shows the PNGs --plots wrote, linked relative to where it lies.
        here = args.markdown.resolve().parent
        _write(args.markdown, to_markdown(report, [os.path.relpath(p.resolve(), here) for p in plots]))
    if args.csv:
        _write(args.csv, to_csv(report))
    if args.html:
        _write(args.html, to_html(report, images))
    for path in plots:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
