"""``maven prepare-demo RECIPE_OR_DIR [--set key=value ...]``: build the demo assets a recipe needs.

Synthetic images and texts, a tokenizer trained on them, random base models, shards with patch labels
and visual codes, all under the recipe's ``run_dir`` (see ``maven_dist/offline/demo.py``). Steps whose
output exists are skipped. ``maven pipeline`` and the launchers run it themselves for recipes with
``demo.enabled``; run it by hand before ``maven train`` of a single demo stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter, add_overrides_option


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven prepare-demo", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("recipe", help="a stage recipe or a recipe directory, e.g. recipes/tiny")
    add_overrides_option(parser, "recipe override")
    parser.add_argument(
        "--if-enabled", action="store_true", help="do nothing (exit 0) for a recipe without demo.enabled"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from maven_dist.config import ConfigError, load_config
    from maven_dist.offline.demo import prepare_demo

    recipe = Path(args.recipe)
    if recipe.is_dir():
        recipe = next(iter(sorted(recipe.glob("stage*.yaml"))), recipe / "stage1.yaml")
    try:
        cfg = load_config(recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.demo.enabled:
        if args.if_enabled:
            return 0
        print(f"error: {recipe} does not use the demo assets (demo.enabled is false)", file=sys.stderr)
        return 2
    prepare_demo(cfg)
    print(f"demo assets ready under {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
