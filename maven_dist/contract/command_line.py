"""What every command of the package agrees on: its exit codes and how its ``--help`` shows defaults.

Exit codes, the same for every ``maven`` subcommand and tool: 0 done; 2 a usage or input error (a bad
option, a missing or malformed input file or directory: the message says which and what to do;
argparse's own usage errors exit 2 as well); 1 an internal failure (with its traceback). A training
stage also exits 75 after a preemption signal (``preemption.REQUEUE_EXIT_CODE``).

Every parser is built by its module's ``build_parser()`` with ``formatter_class=HelpFormatter``, so
``--help`` shows each option's default the same way and ``tests/unit/test_cli_help.py`` can read them.
"""

from __future__ import annotations

import argparse


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` appends ``(default: X)`` to this option's help.

    Not for flags (their default is "off"), required positionals, or a default of None, "" or an
    empty list: there the help says what "not given" means (``default: cuda when present``,
    ``repeatable``), which the bare value would not.
    """
    default = action.default
    if action.nargs == 0 or default is None or default is argparse.SUPPRESS:
        return False
    if not action.option_strings and action.nargs not in ("?", "*"):
        return False
    return not (isinstance(default, str | list | tuple) and not default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout (its examples) and ends an option's help with ``(default: X)``
    when :func:`shows_default` says the value means something on its own. argparse's
    ``ArgumentDefaultsHelpFormatter`` would also print ``(default: None)`` and ``(default: False)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def add_overrides_option(
    parser: argparse.ArgumentParser, help: str = "override a recipe value, e.g. --set stage.max_steps=10"
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: how every command takes recipe overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help} (repeatable)",
    )
