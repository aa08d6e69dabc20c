"""The data-preparation docs and the 7B/13B recipes describe one path from nothing to a stage-4 run.

docs/data_preparation.md's commands (``maven ...``, and ``bash slurm/*_array.sh ...`` with the tool's arguments)
are parsed with the options the ``maven prepare|labels|tokenize`` parsers declare (read from their source,
so no heavy import), and every path a recipe reads must be a file
of the "What to place where" table or the output of a documented command, made with the settings the recipe
trains with; the README's cluster table must say the same. A failure names the doc line and the recipe key.
The project's docs also stay inside the repository: no link leaves it, none is broken.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from maven_dist.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "data_preparation.md"
README = REPO / "README.md"
RECIPES = sorted((REPO / "recipes" / "maven-7b").glob("stage*.yaml")) + sorted(
    (REPO / "recipes" / "maven-13b").glob("stage*.yaml")
)
CLI = {name: REPO / "maven_dist" / "cli" / f"{name}.py" for name in ("prepare", "labels", "tokenize")}
WORK_SHARE = (
    REPO / "maven_dist" / "cli" / "work_share.py"
)  # the --num-shards options labels and tokenize share
# `bash slurm/labels_array.sh ARGS` (or `sbatch [OPTIONS] slurm/labels_array.sh ARGS`) runs `maven labels ARGS`.
ARRAY_SCRIPTS = {"slurm/labels_array.sh": "labels", "slurm/tokenize_array.sh": "tokenize"}
MODEL_KEYS = (
    "model.llm.path",
    "model.vision.path",
    "model.discrete.path",
    "model.discrete.eva_path",
    "model.tokenizer_path",
)
# Vicuna-7B and -13B v1.5 share LLaMA's tokenizer: the docs prepare the shards once, with the 7B one.
SAME_TOKENIZER = {"models/vicuna-13b-v1.5": "models/vicuna-7b-v1.5"}


def norm(path: str | Path) -> str:
    """A path as the docs and recipes spell it: POSIX, no trailing slash, no `./`."""
    return PurePosixPath(str(path).strip().strip("`").rstrip("/")).as_posix()


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --------------------------------------------------------------------------- markdown


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every ```lang block of a Markdown file."""
    blocks, current, start, inside = [], [], 0, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if inside is None and fence.startswith("```"):
            inside, start, current = fence[3:].strip(), number + 1, []
        elif inside is not None and fence == "```":
            if inside == lang:
                blocks.append((start, current))
            inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def section(path: Path, heading: str) -> tuple[int, list[str]]:
    """(first line number, lines) of the `## heading` section of a Markdown file."""
    lines = path.read_text().splitlines()
    begin = next((k for k, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    assert begin is not None, f"{rel(path)} has no '## {heading}' section"
    end = next((k for k in range(begin + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return begin + 1, lines[begin:end]


def table_rows(path: Path, heading: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the rows of the first table in a section, header and rule left out."""
    first, lines = section(path, heading)
    rows = []
    for k, line in enumerate(lines):
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append((first + k, [c.strip() for c in line.strip().strip("|").split("|")]))
    assert len(rows) > 2, f"{rel(path)}: no table in '## {heading}'"
    return rows[2:]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@dataclass
class Command:
    """One documented ``maven`` command and where it is written."""

    where: str
    """`file:line` of its first line."""
    text: str
    """The command as written, continuation lines joined."""
    name: str
    """prepare, labels or tokenize."""
    args: argparse.Namespace = field(default_factory=argparse.Namespace)


class _DocParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; name the doc line instead
        raise ValueError(message)


def cli_parser(name: str) -> argparse.ArgumentParser:
    """A parser with the options ``maven_dist/cli/<name>.py`` declares (names, actions, nargs, defaults,
    required), read from its source: the commands are checked against the real flags without importing
    torch. Values stay strings (``type=`` is not replayed)."""
    source = CLI[name].read_text()
    sources = [source] + ([WORK_SHARE.read_text()] if "add_work_share_arguments" in source else [])
    parser = _DocParser(prog=f"maven {name}", add_help=False)
    calls = [
        n
        for text in sources
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
    ]
    for call in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
        names = [ast.literal_eval(a) for a in call.args]
        kwargs = {}
        for kw in call.keywords:
            if kw.arg in ("action", "nargs", "required", "default", "choices", "dest"):
                # A name (choices=TEMPLATES) is not replayed: those values are not checked here.
                with contextlib.suppress(ValueError):
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
        parser.add_argument(*names, **kwargs)
    return parser


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(`file:line`, argv) of every command in the bash blocks of `path`, continuations joined."""
    out = []
    for start, lines in fenced_blocks(path, "bash"):
        pending, first = "", None
        for k, line in enumerate(lines):
            first = start + k if not pending else first
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            argv = shlex.split(pending, comments=True)
            if argv:
                out.append((f"{rel(path)}:{first}", argv))
            pending = ""
    return out


def as_maven(argv: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) of a documented ``maven`` command or array script, else None."""
    if argv[0] == "maven" and len(argv) > 1:
        return argv[1], argv[2:]
    if argv[0] in ("bash", "sbatch"):
        scripts = [k for k, a in enumerate(argv) if norm(a) in ARRAY_SCRIPTS]
        if scripts:
            return ARRAY_SCRIPTS[norm(argv[scripts[0]])], argv[scripts[0] + 1 :]
    return None


def maven_commands(path: Path) -> list[Command]:
    parsers = {name: cli_parser(name) for name in CLI}
    out = []
    for where, argv in shell_commands(path):
        command = as_maven(argv)
        if command is None or command[0] not in parsers:
            continue
        name, rest = command
        text = shlex.join(argv)
        try:
            args = parsers[name].parse_args(rest)
        except ValueError as err:
            raise AssertionError(f"{where}: `{text}` does not parse as `maven {name}`: {err}") from None
        out.append(Command(where, text, name, args))
    return out


def python_files(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Files the Python blocks of `path` read and write: ``open("x")`` / ``open("x", "w")`` -> `file:line`."""
    reads, writes = {}, {}
    for start, lines in fenced_blocks(path, "python"):
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open" and node.args):
                continue
            if not isinstance(node.args[0], ast.Constant):
                continue
            mode = ast.literal_eval(node.args[1]) if len(node.args) > 1 else "r"
            target = writes if "w" in mode else reads
            target[norm(node.args[0].value)] = f"{rel(path)}:{start + node.lineno - 1}"
    return reads, writes


@dataclass(frozen=True)
class Placed:
    line: int
    read_by: str
    comes_from: str


def placed_files() -> dict[str, Placed]:
    rows = {}
    for line, cells in table_rows(DOC, "What to place where"):
        spans = code_spans(cells[0])
        assert len(spans) == 1, (
            f"{rel(DOC)}:{line}: a row of 'What to place where' names one path, got {cells[0]}"
        )
        assert cells[3], f"{rel(DOC)}:{line}: {spans[0]} does not say where it comes from"
        rows[norm(spans[0])] = Placed(line, cells[1], cells[3])
    return rows


# --------------------------------------------------------------------------- recipes


def recipe_value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def family(recipe: Path) -> str:
    return recipe.parent.name.removeprefix("maven-").upper()  # 7B, 13B


def stage_number(cfg: Config) -> int:
    return int(cfg.stage.name.removeprefix("stage"))


@pytest.fixture(scope="module")
def docs():
    commands = maven_commands(DOC)
    reads, writes = python_files(DOC)
    return {"commands": commands, "placed": placed_files(), "reads": reads, "writes": writes}


@pytest.fixture(scope="module")
def recipes():
    return {recipe: load_config(recipe) for recipe in RECIPES}


def outputs(commands: list[Command]) -> dict[str, Command]:
    return {norm(c.args.out): c for c in commands if c.name == "prepare"}


def covering(commands: list[Command], name: str, shards: str) -> list[Command]:
    return [c for c in commands if c.name == name and shards in {norm(s) for s in c.args.shards}]


def _listing(commands: list[Command]) -> str:
    return "; ".join(f"{c.where}: {c.text}" for c in commands) or "none"


# --------------------------------------------------------------------------- the checks


def test_the_docs_name_every_command_and_file_the_recipes_need(docs, recipes):
    assert len(RECIPES) >= 8, f"expected the 7B and 13B stage recipes, found {[rel(r) for r in RECIPES]}"
    names = {c.name for c in docs["commands"]}
    assert names == {"prepare", "labels", "tokenize"}, f"{rel(DOC)} documents only {sorted(names)}"
    sources = {norm(s) for c in docs["commands"] if c.name == "prepare" for s in c.args.sources}
    for name in ("blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json"):
        assert any(s.endswith(name) for s in sources), f"{rel(DOC)} has no `maven prepare` of {name}"
    # The files no recipe key names (only a command reads them) must be in the table as well.
    for what, name in (("Grounding DINO", "grounding-dino"), ("SAM", "sam-vit"), ("EVA ViT-g", "eva_vit_g")):
        assert any(name in p for p in docs["placed"]), f"{rel(DOC)}'s 'What to place where' has no {what} row"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: rel(p))
def test_every_model_file_a_recipe_reads_is_in_the_table_of_files_to_place(recipe, recipes, docs):
    cfg, placed = recipes[recipe], docs["placed"]
    for key in MODEL_KEYS:
        value = recipe_value(cfg, key)
        if not value:
            continue
        path = norm(cfg.resolve_path(value))
        assert path in placed, (
            f"{rel(recipe)}: {key}={value} is not a row of {rel(DOC)}'s 'What to place where' table "
            f"(its paths: {sorted(placed)})"
        )
        row = placed[path]
        assert key in code_spans(row.read_by), (
            f"{rel(DOC)}:{row.line}: the row of {path} does not name `{key}`, which {rel(recipe)} reads it as"
        )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: rel(p))
def test_every_shards_directory_a_recipe_reads_is_made_by_the_documented_commands(recipe, recipes, docs):
    cfg, commands = recipes[recipe], docs["commands"]
    made = outputs(commands)
    dirs = [norm(cfg.resolve_path(p)) for p in cfg.data.paths]
    if cfg.data.val_path:
        dirs.append(norm(cfg.resolve_path(cfg.data.val_path)))
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    llm = norm(cfg.resolve_path(cfg.model.tokenizer_path or cfg.model.llm.path))
    d = cfg.model.discrete
    for shards in dirs:
        key = f"{rel(recipe)}: data.path {shards}"
        assert shards in made, (
            f"{key} is written by no `maven prepare --out` in {rel(DOC)} (it writes: "
            + "; ".join(f"{c.where}: --out {norm(c.args.out)}" for c in made.values())
            + ")"
        )
        prep = made[shards]
        a, at = prep.args, f"{prep.where} (`maven prepare --out {shards}`)"
        assert SAME_TOKENIZER.get(llm, llm) == norm(a.tokenizer), (
            f"{at} measures lengths with --tokenizer {a.tokenizer}, {rel(recipe)} trains "
            f"model.llm.path={cfg.model.llm.path}"
        )
        assert a.tower is not None and norm(a.tower) == norm(cfg.resolve_path(cfg.model.vision.path)), (
            f"{at} letterboxes for --tower {a.tower}, {rel(recipe)} has model.vision.path={cfg.model.vision.path}"
        )
        expected_template = cfg.data.template if cfg.data.format == "conversations" else "plain"
        assert a.template == expected_template, (
            f"{at} uses --template {a.template}; {rel(recipe)} reads it as data.format={cfg.data.format} "
            f"with data.template={cfg.data.template}, so its lengths are measured in {expected_template}"
        )
        for flag, value, recipe_key, want in (
            ("--max-length", int(a.max_length), "data.max_length", cfg.data.max_length),
            ("--num-codes", int(a.num_codes), "model.discrete.num_codes", d.num_codes),
            ("--num-patches", int(a.num_patches), "model.vision image_size/patch_size squared", grid * grid),
            ("--keep-ratio", float(a.keep_ratio), "model.selector.keep_ratio", cfg.model.selector.keep_ratio),
        ):
            assert value == want, f"{at}: {flag} {value}, but {rel(recipe)} has {recipe_key}={want}"

        tokenized = [c for c in covering(commands, "tokenize", shards) if c.args.tokenizer == d.tokenizer]
        assert tokenized, (
            f"{key} gets no `maven tokenize --tokenizer {d.tokenizer}` in {rel(DOC)} "
            f"(tokenize commands: {_listing([c for c in commands if c.name == 'tokenize'])})"
        )
        for c in tokenized:
            assert norm(c.args.path) == norm(cfg.resolve_path(d.path)), (
                f"{c.where}: `maven tokenize --path {c.args.path}` but {rel(recipe)} has "
                f"model.discrete.path={d.path} (the export records it, inference tokenises with it)"
            )
            eva = norm(c.args.eva) if c.args.eva else ""
            assert eva == (norm(cfg.resolve_path(d.eva_path)) if d.eva_path else ""), (
                f"{c.where}: `maven tokenize --eva {c.args.eva}` but {rel(recipe)} has "
                f"model.discrete.eva_path={d.eva_path!r}"
            )
        if d.tokenizer == "seed":
            assert a.keep_original, (
                f"{at} has no --keep-original: SEED would encode the letterboxed copy, not the image "
                "it sees at inference"
            )

        if cfg.data.format == "patch_labels":
            labelled = covering(commands, "labels", shards)
            assert labelled, f"{key} (data.format=patch_labels) gets no `maven labels` in {rel(DOC)}"
            for c in labelled:
                tower = norm(c.args.tower) if c.args.tower else None
                assert tower == norm(cfg.resolve_path(cfg.model.vision.path)) or (
                    c.args.grid is not None and int(c.args.grid) == grid
                ), (
                    f"{c.where}: `maven labels` grid from {c.args.tower or c.args.grid}, {rel(recipe)} needs {grid}"
                )

    if len(dirs) > 1:  # read as one data set: the same columns, so the same preparation

        def settings(c: Command) -> dict:
            return {k: v for k, v in vars(c.args).items() if k not in ("sources", "out", "image_root")}

        first, *rest = (made[s] for s in dirs)
        for other in rest:
            assert settings(other) == settings(first), (
                f"{other.where} and {first.where} prepare shards that {rel(recipe)} reads together "
                f"(data.path={cfg.data.path}) with different flags"
            )


def test_every_input_of_a_documented_command_is_placed_or_made(docs):
    placed, commands, made = docs["placed"], docs["commands"], outputs(docs["commands"])
    written = docs["writes"]

    def check(where: str, what: str, path, allowed: set[str]) -> None:
        assert norm(path) in allowed, (
            f"{where}: {what} {path} is neither a row of 'What to place where' ({rel(DOC)}) nor made by a "
            "documented step"
        )

    for c in commands:
        a = c.args
        if c.name == "prepare":
            for s in a.sources:
                check(c.where, "source", s, set(placed) | set(written))
            root = norm(a.image_root)
            assert root in placed or any(p.startswith(root + "/") for p in placed), (
                f"{c.where}: --image-root {root} holds none of the placed files"
            )
            check(c.where, "--tokenizer", a.tokenizer, set(placed))
            if a.tower:
                check(c.where, "--tower", a.tower, set(placed))
        elif c.name == "labels":
            for s in a.shards:
                check(c.where, "shards", s, set(made))
            for flag in ("annotations", "tower", "dino", "sam"):
                value = getattr(a, flag)
                for v in value if isinstance(value, list) else [value] if value else []:
                    check(c.where, f"--{flag}", v, set(placed))
        elif c.name == "tokenize":
            for s in a.shards:
                check(c.where, "shards", s, set(made))
            if not a.train_kmeans:  # --train-kmeans writes --path itself
                check(c.where, "--path", a.path, set(placed))
            for flag in ("eva", "tower"):
                if getattr(a, flag):
                    check(c.where, f"--{flag}", getattr(a, flag), set(placed))
    for path, where in docs["reads"].items():
        check(where, "the file", path, set(placed))


def test_every_placed_file_and_every_prepared_directory_is_used(docs, recipes):
    placed, commands = docs["placed"], docs["commands"]
    used = set(docs["reads"])
    roots = set()
    for c in commands:
        for v in vars(c.args).values():
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, str):
                    used.add(norm(item))
        if c.name == "prepare":
            roots.add(norm(c.args.image_root))
    for cfg in recipes.values():
        used |= {norm(cfg.resolve_path(recipe_value(cfg, k))) for k in MODEL_KEYS if recipe_value(cfg, k)}
    for path, row in placed.items():
        inside_a_root = any(path.startswith(r + "/") for r in roots)
        assert path in used or inside_a_root, (
            f"{rel(DOC)}:{row.line}: {path} is to be placed, but no documented command or recipe reads it"
        )
    read = {norm(cfg.resolve_path(p)) for cfg in recipes.values() for p in cfg.data.paths}
    for out, c in outputs(commands).items():
        assert out in read, f"{c.where}: `maven prepare --out {out}` is read by no 7B/13B recipe's data.path"


def test_the_stage_table_says_what_the_recipes_read(recipes):
    by_stage: dict[int, dict[str, list[str]]] = {}
    for recipe, cfg in recipes.items():
        by_stage.setdefault(stage_number(cfg), {})[rel(recipe)] = [
            norm(cfg.resolve_path(p)) for p in cfg.data.paths
        ]
    rows = table_rows(DOC, "What each stage reads")
    assert {int(cells[0].split()[0]) for _, cells in rows} == set(by_stage), (
        f"{rel(DOC)}: 'What each stage reads' lists stages {[cells[0] for _, cells in rows]}"
    )
    for line, cells in rows:
        listed = [norm(p) for p in code_spans(cells[1])]
        for recipe, paths in by_stage[int(cells[0].split()[0])].items():
            assert listed == paths, (
                f"{rel(DOC)}:{line} lists {listed} for stage {cells[0]}, {recipe} data.path is {paths}"
            )


def test_the_readme_cluster_table_agrees_with_the_recipes_and_the_docs(recipes, docs):
    rows = table_rows(README, "On a GPU cluster")
    listed: dict[str, tuple[int, str]] = {}
    for line, cells in rows:
        (path,) = code_spans(cells[0])
        listed[norm(path)] = (line, cells[1])
        keys = [k for k in code_spans(cells[1]) if k.startswith(("model.", "data."))]
        qualifier = cells[1].split("`")[-1]
        for key in keys:
            chosen = {
                r: cfg
                for r, cfg in recipes.items()
                if (not re.search(r"\b(7B|13B)\b", qualifier) or re.search(rf"\b{family(r)}\b", qualifier))
                and ("stage" not in qualifier or str(stage_number(cfg)) in re.findall(r"\d+", qualifier))
            }
            assert chosen, f"README.md:{line}: no 7B/13B recipe matches `{key}`{qualifier}"
            for r, cfg in chosen.items():
                value = recipe_value(cfg, key)
                values = [norm(cfg.resolve_path(v)) for v in (value if isinstance(value, list) else [value])]
                assert norm(path) in values, (
                    f"README.md:{line}: {path} as `{key}`, but {rel(r)} has {key}={value}"
                )
        if not keys:  # a file only a documented command reads: the same path as the docs' table
            assert norm(path) in docs["placed"], f"README.md:{line}: {path} is not in {rel(DOC)}'s table"
    for r, cfg in recipes.items():
        paths = {k: recipe_value(cfg, k) for k in MODEL_KEYS if recipe_value(cfg, k)}
        for k, v in paths.items():
            assert norm(cfg.resolve_path(v)) in listed, (
                f"{rel(r)}: {k}={v} is missing from README.md's cluster table"
            )
        for p in cfg.data.paths:
            assert norm(cfg.resolve_path(p)) in listed, (
                f"{rel(r)}: data.path {p} is missing from README.md's table"
            )
    for where, argv in shell_commands(README):
        for token in argv:
            if token.startswith(("recipes/", "slurm/", "docs/", "tools/")):
                assert (REPO / token).exists(), f"{where}: {token} does not exist"


# --------------------------------------------------------------------------- docs stay in the repository

PROJECT_DOCS = [README, *sorted((REPO / "docs").rglob("*.md"))]
# A parent-directory reference to the workspace's design notes; `.../shared/stage1` (an elided run path) is not.
OUTSIDE = re.compile(r"(?<![.\w])\.\./shared\b|shared/(DESIGN|STYLE)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The Markdown without fenced blocks and inline code, where `[x](y)` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("doc", PROJECT_DOCS, ids=lambda p: rel(p))
def test_project_docs_do_not_point_outside_the_repository(doc):
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        match = OUTSIDE.search(line)
        assert match is None, (
            f"{rel(doc)}:{number}: {match.group(0)!r}: the project's docs live in the repository"
        )


@pytest.mark.parametrize("doc", PROJECT_DOCS, ids=lambda p: rel(p))
def test_every_relative_link_in_the_docs_points_to_a_file_in_the_repository(doc):
    text = _prose(doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https:, mailto:, an anchor of the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{rel(doc)}: link {target} leaves the repository"
        assert path.exists(), (
            f"{rel(doc)}: link {target} points to {path.relative_to(REPO)}, which does not exist"
        )
