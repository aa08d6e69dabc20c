"""The options of the tools that split their shard files over processes (``maven labels``, ``maven
tokenize``): ``--num-shards N --shard-index I`` and ``--dry-run`` (``offline/shard_jobs.py`` plans the
split)."""

from __future__ import annotations

import argparse

from maven_dist.offline.shard_jobs import WorkShare


def add_work_share_arguments(parser: argparse.ArgumentParser, verb: str, array_script: str) -> None:
    """The options, in their own group; ``verb`` says what the tool does to a shard file (labels, encodes)."""
    split = parser.add_argument_group(
        f"splitting the work over processes (GPUs, a Slurm array: {array_script})"
    )
    split.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help=f"number of processes sharing the work; each {verb} a disjoint part of the shard files",
    )
    split.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="this process's part, 0 .. N-1: every N-th shard file of SHARDS (in the order given) from here",
    )
    split.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments and inputs, print the shard files this process would work on, and exit",
    )


def work_share(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorkShare:
    """This process's part; a usage error (exit 2) for an index outside 0 .. N-1 or N < 1."""
    try:
        return WorkShare(args.shard_index, args.num_shards)
    except ValueError as exc:
        parser.error(f"--shard-index {args.shard_index} of --num-shards {args.num_shards}: {exc}")
