"""A sweep file: a recipe, the settings every arm shares, and the arms (a grid and/or named arms).

.. code-block:: yaml

    name: keep-ratio-7b             # MLflow tag maven.sweep and the default output folder
    recipe: ../maven-7b             # a recipe directory, relative to this file
    experiment: maven-7b-ablations  # optional; default: the sweep's name
    set: [data.num_workers=8]       # optional: overrides for every arm and every stage
    stages: [stage3, stage4]        # optional: the stages the sweep runs (default: all four); the ones
                                    #   before them start from stage.init_from as the recipe says
    shared: [stage2, stage1]        # optional: stages run once, before the arms, with the shared settings;
                                    #   the arms start from their exports
    grid:                           # every combination is an arm (named keep_ratio=0.1,...)
      model.selector.keep_ratio: [0.1, 0.25, 0.5, 1.0]
    arms:                           # and/or arms by name
      discrete-only:
        set: [model.selector.keep_ratio=0.25]
        stage_set: {stage4: ["stage.views=[discrete]"]}
    seeds: [0, 1, 2]                # optional: every arm once per training seed (``seed=N``), named
                                    #   <arm>,seed=N; the report gives each arm's mean and std over them.
                                    #   The shared stages and the demo world (demo.seed) stay one.

Values are YAML scalars or lists, written into ``--set key=value`` overrides as the pipeline reads them.
Everything that is wrong (an unknown key at the top, a grid key without values, two arms with one name, a
shared stage the recipe does not have) is a :class:`SweepError` naming the file.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maven_dist.config import STAGE_NAMES

TOP_KEYS = {"name", "recipe", "experiment", "set", "stages", "shared", "grid", "arms", "seeds"}
ARM_KEYS = {"set", "stage_set"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=-]{0,99}$")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9._,=-]")
_SEED_SUFFIX = re.compile(r",seed=-?[0-9]+$")


class SweepError(ValueError):
    """The sweep file cannot be used; the message names the file and what to fix."""


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()
    """``KEY=VALUE`` for every stage of the arm."""
    stage_overrides: tuple[str, ...] = ()
    """``STAGE:KEY=VALUE`` for one stage."""

    def fingerprint(self) -> str:
        """What the arm runs with: a rerun with other settings is a different arm, not a finished one."""
        return json.dumps([self.overrides, self.stage_overrides])


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    recipe: Path
    experiment: str
    overrides: tuple[str, ...]
    shared: tuple[str, ...]
    arms: tuple[Arm, ...] = field(default_factory=tuple)
    stages: tuple[str, ...] = STAGE_NAMES
    """The stages the sweep runs: the shared ones once, the others in every arm."""

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise SweepError(f"{self.path}: no arm {name!r}; arms: {[a.name for a in self.arms]}")


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"sweep file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (name, recipe, grid and/or arms)")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; a sweep has {sorted(TOP_KEYS)}")
    name = _name(raw.get("name"), path, "name")
    recipe = (path.parent / str(raw.get("recipe", ""))).resolve()
    if not raw.get("recipe") or not all((recipe / f"{s}.yaml").is_file() for s in STAGE_NAMES):
        raise SweepError(f"{path}: recipe {raw.get('recipe')!r} is not a recipe directory (stage1..4.yaml)")
    stages = _stage_names(raw.get("stages", list(STAGE_NAMES)), path, "stages")
    shared = _stage_names(raw.get("shared", []), path, "shared")
    if set(shared) - set(stages):
        raise SweepError(
            f"{path}: shared stages {sorted(set(shared) - set(stages))} are not in stages {stages}"
        )
    arms = [*_grid_arms(raw.get("grid") or {}, path), *_named_arms(raw.get("arms") or {}, path)]
    if not arms:
        raise SweepError(f"{path}: no arms; give a grid or arms")
    if "seeds" in raw:
        arms = _seeded(arms, raw["seeds"], path)
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1} | ({"shared"} & set(names)))
    if twice:
        raise SweepError(f"{path}: arm names must be unique and not 'shared': {twice}")
    return Sweep(
        name=name,
        path=path.resolve(),
        recipe=recipe,
        experiment=str(raw.get("experiment") or name),
        overrides=tuple(_strings(raw.get("set", []), path, "set")),
        shared=shared,
        arms=tuple(arms),
        stages=tuple(s for s in STAGE_NAMES if s in stages),
    )


def _stage_names(value, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SweepError(f"{path}: {key} takes a list of stage names, got {value!r}")
    bad = sorted(set(value) - set(STAGE_NAMES))
    if bad:
        raise SweepError(f"{path}: {key} {bad} are not stages of a recipe ({list(STAGE_NAMES)})")
    return value


def _grid_arms(grid: dict, path: Path) -> list[Arm]:
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: grid is a mapping of recipe keys to lists of values")
    if not grid:
        return []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid key {key!r} needs a non-empty list of values")
    arms = []
    for combo in itertools.product(*grid.values()):
        pairs = list(zip(grid, combo, strict=True))
        label = ",".join(_NOT_IN_NAME.sub("", f"{k.rsplit('.', 1)[-1]}={_text(v)}") for k, v in pairs)
        arms.append(Arm(_name(label, path, "arm"), tuple(f"{k}={_text(v)}" for k, v in pairs)))
    return arms


def _named_arms(arms: dict, path: Path) -> list[Arm]:
    if not isinstance(arms, dict):
        raise SweepError(f"{path}: arms is a mapping of arm names to their settings")
    out = []
    for name, body in arms.items():
        body = body or {}
        if not isinstance(body, dict) or set(body) - ARM_KEYS:
            raise SweepError(f"{path}: arm {name!r} takes {sorted(ARM_KEYS)}")
        per_stage = body.get("stage_set") or {}
        if not isinstance(per_stage, dict) or set(per_stage) - set(STAGE_NAMES):
            raise SweepError(
                f"{path}: arm {name!r}: stage_set maps stage names {list(STAGE_NAMES)} to overrides"
            )
        stage_overrides = tuple(
            f"{stage}:{item}" for stage, items in per_stage.items() for item in _strings(items, path, name)
        )
        out.append(
            Arm(_name(name, path, "arm"), tuple(_strings(body.get("set", []), path, name)), stage_overrides)
        )
    return out


def _seeded(arms: list[Arm], seeds, path: Path) -> list[Arm]:
    """Every arm once per seed, the seed last in its name (:func:`arm_group` takes it off again)."""
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise SweepError(f"{path}: seeds takes a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) < len(seeds):
        raise SweepError(f"{path}: seeds {seeds} name a seed twice")
    if any(item.startswith("seed=") for arm in arms for item in arm.overrides):
        raise SweepError(f"{path}: an arm sets seed= itself; give the seeds in seeds: only")
    return [
        Arm(
            _name(f"{arm.name},seed={seed}", path, "arm"),
            (*arm.overrides, f"seed={seed}"),
            arm.stage_overrides,
        )
        for arm in arms
        for seed in seeds
    ]


def arm_group(arm: str) -> str:
    """The arm a run belongs to, less the seed a ``seeds:`` sweep adds to its name."""
    return _SEED_SUFFIX.sub("", arm)


def _strings(value, path: Path, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{path}: {where} takes a list of KEY=VALUE strings, got {value!r}")
    return value


def _name(value, path: Path, what: str) -> str:
    text = str(value or "")
    if not _NAME.match(text):
        raise SweepError(
            f"{path}: {what} {text!r} must be 1-100 letters, digits, '.', '_', ',', '=', '-' (starting with a "
            "letter or digit): it names folders and MLflow tags"
        )
    return text


def _text(value) -> str:
    """A YAML value as the text of a ``--set`` override (lists as YAML flow lists)."""
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)
