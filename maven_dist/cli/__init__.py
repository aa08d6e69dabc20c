"""``maven``: one console script for everything a user runs.

    maven SUBCOMMAND [ARGS...]        maven SUBCOMMAND --help for each one's options

Each subcommand is a module's ``main(argv) -> exit code``, imported only when it runs, so ``maven --help``
is instant. The older spellings (``python -m maven_dist.train``, ``maven merge``, ...) are
thin aliases of these. Exit codes are uniform: 0 ok, 2 usage or input error, 1 internal failure.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from maven_dist.entry_point import prepare_process


@dataclass(frozen=True)
class Subcommand:
    module: str
    """Module with a ``main(argv)`` function."""
    help: str
    """One line for ``maven --help``."""


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        "maven_dist.train.__main__", "train one stage of a recipe (under torchrun: every rank)"
    ),
    "pipeline": Subcommand("maven_dist.pipeline", "run a recipe's stages in order, one torchrun each"),
    "sweep": Subcommand(
        "maven_dist.sweep.cli", "run a sweep's ablation arms (locally or a Slurm array) and compare them"
    ),
    "launch": Subcommand(
        "maven_dist.launch.__main__", "submit one stage to Slurm (or run it locally) via submitit"
    ),
    "plan": Subcommand(
        "maven_dist.parallel.memory_plan", "per-GPU memory of every parallel layout of a recipe"
    ),
    "prepare-demo": Subcommand(
        "maven_dist.cli.demo", "build the demo assets a recipe with demo.enabled needs"
    ),
    "prepare": Subcommand("maven_dist.cli.prepare", "LLaVA-format JSON + images -> validated Arrow shards"),
    "labels": Subcommand("maven_dist.cli.labels", "write stage-1 patch pseudo labels into shards"),
    "tokenize": Subcommand("maven_dist.cli.tokenize", "write every image's discrete codes into shards"),
    "synthetic": Subcommand("maven_dist.cli.synthetic", "write the synthetic shapes data set"),
    "merge": Subcommand("maven_dist.cli.merge", "sharded training checkpoint -> one HF-layout MaVEn model"),
    "compare": Subcommand(
        "maven_dist.cli.compare", "compare runs across MLflow stores: a row per arm, HTML/Markdown/CSV report"
    ),
    "eval": Subcommand(
        "maven_dist.eval.cli", "score a trained MaVEn on benchmarks (the synthetic set by default)"
    ),
    "chat": Subcommand(
        "maven_dist.inference.chat", "talk to a trained MaVEn: text and images in, answers out"
    ),
    "sync": Subcommand(
        "maven_dist.cli.sync", "send a run directory's tracking records to their MLflow store"
    ),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {cmd.help}" for name, cmd in SUBCOMMANDS.items()]
    return (
        "usage: maven SUBCOMMAND [ARGS...]\n\nsubcommands:\n"
        + "\n".join(lines)
        + ("\n\n'maven SUBCOMMAND --help' shows a subcommand's options.")
    )


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"maven: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name].module)
    sys.argv[0] = f"maven {name}"
    try:
        code = module.main(rest)
    except SystemExit as exc:  # argparse's own exits (--help, usage errors: 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
