"""Every ``maven`` subcommand and tool documents every option, shows its default the same way, and exits
with the shared codes (maven_dist/contract/command_line.py): 0 ok, 2 a usage or input error, 1 else."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from maven_dist.cli import SUBCOMMANDS, main
from maven_dist.contract.command_line import HelpFormatter, shows_default

# `maven SUBCOMMAND` modules, and the launch checks slurm/launch.sh runs as a module of their own.
MODULES = {name: cmd.module for name, cmd in SUBCOMMANDS.items()} | {
    "launch.checks": "maven_dist.launch.checks"
}


def build_parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(MODULES[name])
    assert hasattr(module, "build_parser"), f"{MODULES[name]} has no build_parser(): the help is not testable"
    return module.build_parser()


def option_problems(parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with the options' help: missing, a default it does not show, a default said twice."""
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        if not action.help or action.help is argparse.SUPPRESS:
            problems.append(f"{label}: no help text")
            continue
        text = formatter._expand_help(action)
        said = len(re.findall(r"[(;,]\s*default\b", text))  # "(default: X)", "(default X)", "; default X"
        if shows_default(action) and f"(default: {action.default})" not in text:
            problems.append(f"{label}: its default {action.default!r} is not shown ({text!r})")
        elif isinstance(action.default, str) and not action.default and action.option_strings and not said:
            problems.append(f'{label}: default "" does not say what leaving it out means ({text!r})')
        if said > 1:
            problems.append(f"{label}: says its default twice ({text!r}); the formatter appends it")
    return problems


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_option_has_help_and_shows_its_default(name):
    parser = build_parser(name)
    assert parser.formatter_class is HelpFormatter, (
        f"{MODULES[name]}: use contract.command_line.HelpFormatter"
    )
    assert option_problems(parser) == [], MODULES[name]
    parser.format_help()  # renders (a stray % in a help string would raise here)


def test_the_check_catches_what_it_is_for():
    parser = argparse.ArgumentParser(formatter_class=argparse.HelpFormatter)
    parser.add_argument("--quiet-default", type=int, default=3, help="hides its default")
    parser.add_argument("--no-help", type=int)
    parser.add_argument("--twice", type=int, default=4, help="says it (default 4)")
    parser.add_argument("--empty", default="", help="an empty default, unexplained")
    found = [p.split(":")[0] for p in option_problems(parser)]
    assert found == ["--quiet-default", "--no-help", "--twice", "--empty"]
    parser.formatter_class = HelpFormatter
    assert [p.split(":")[0] for p in option_problems(parser)] == ["--no-help", "--twice", "--empty"]


def test_help_shows_meaningful_defaults_only():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--overwrite", action="store_true", help="recompute")
    parser.add_argument("--set", action="append", default=[], help="override (repeatable)")
    text = " ".join(parser.format_help().split())
    assert "images per batch (default: 8)" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_a_usage_error_exits_2_and_help_exits_0(name, capsys):
    assert main([name, "--no-such-option"]) == 2
    assert f"maven {name}: error:" in capsys.readouterr().err
    assert main([name, "--help"]) == 0
    assert "usage: maven" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (
            ["labels", "{tmp}/none", "--source", "coco", "--annotations", "{tmp}/a.json", "--grid", "4"],
            "a.json",
        ),
        (["labels", "{tmp}/none", "--source", "vg", "--annotations", "{tmp}", "--grid", "4"], "none"),
        (
            ["tokenize", "{tmp}", "--tokenizer", "seed", "--path", "{tmp}/seed_quantizer.pt"],
            "seed_quantizer.pt",
        ),
        (["tokenize", "{tmp}/none", "--tokenizer", "seed", "--path", "{tmp}"], "none"),
        (
            [
                "prepare",
                "{tmp}/x.json",
                "--image-root",
                "{tmp}",
                "--out",
                "{tmp}/o",
                "--tokenizer",
                "{tmp}/t",
            ],
            "t",
        ),
        (["plan", "{tmp}/stage4.yaml", "--gpus", "8"], "stage4.yaml"),
        (["merge", "{tmp}/none", "{tmp}/out"], "none"),
        (["sync", "{tmp}/none"], "none"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_an_input_that_cannot_be_used_exits_2_and_is_named(argv, named, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err and "Traceback" not in err
