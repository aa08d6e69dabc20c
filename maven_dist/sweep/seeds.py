"""A ``seeds:`` sweep's summary: every arm's mean and standard deviation over its seeds.

* ``report/seeds.csv``: every ``eval/*`` number of the arms' parent runs; one row per arm and metric, with
  the mean, the sample standard deviation (ddof 1; empty with one seed) and how many seeds it counts.
* ``report/seeds.md``: the synthetic world's held-out questions (``maven prepare-demo``'s task
  ``heldout``), as "mean ± std": accuracy and visual gain against the blank-image control for the
  single-image kinds together (their mean, per seed) and the two-image kinds apart, then each kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from maven_dist.offline.synthetic_benchmarks import HELDOUT_KINDS
from maven_dist.sweep.spec import arm_group

TWO_IMAGE_KINDS = ("compare",)
"""The held-out kinds asked about two images (``offline/synthetic_benchmarks.py``); the others show one."""
GAIN = "visual_gain_blank"
"""The metric suffix ``maven eval --control blank`` logs: accuracy with the image minus with a blank one."""


def heldout_key(kind: str, gain: bool = False) -> str:
    return f"eval/heldout/{kind}/accuracy" + (f"/{GAIN}" if gain else "")


def with_image_groups(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` plus the held-out kinds' mean per group (``single_image``, ``two_image``), for the
    accuracy and the gain, wherever the run has at least one kind of the group."""
    out = dict(metrics)
    two = set(TWO_IMAGE_KINDS)
    groups = {"single_image": [k for k in HELDOUT_KINDS if k not in two], "two_image": list(TWO_IMAGE_KINDS)}
    for group, kinds in groups.items():
        for gain in (False, True):
            values = [metrics[heldout_key(k, gain)] for k in kinds if heldout_key(k, gain) in metrics]
            if values:
                out[heldout_key(group, gain)] = sum(values) / len(values)
    return out


def seed_table(arms: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """arm name (with its seed) -> its ``eval/*`` metrics, to one row per arm (less the seed) and metric:
    columns ``mean``, ``std``, ``seeds``, in the arms' order."""
    rows = [
        {"arm": arm_group(name), "metric": key, "value": value}
        for name, metrics in arms.items()
        for key, value in sorted(with_image_groups(metrics).items())
        if key.startswith("eval/")
    ]
    if not rows:
        return pd.DataFrame(columns=["mean", "std", "seeds"])
    grouped = pd.DataFrame(rows).groupby(["arm", "metric"], sort=False)["value"]
    return grouped.agg(["mean", "std", "count"]).rename(columns={"count": "seeds"})


def heldout_markdown(table: pd.DataFrame) -> str:
    """The held-out columns of :func:`seed_table` as a Markdown table of "mean ± std" cells."""
    columns = {
        "single-image accuracy": heldout_key("single_image"),
        "single-image gain": heldout_key("single_image", gain=True),
        "two-image accuracy": heldout_key("two_image"),
        "two-image gain": heldout_key("two_image", gain=True),
        **{kind: heldout_key(kind) for kind in HELDOUT_KINDS},
    }
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for arm in table.index.get_level_values("arm").unique():
        rows = table.loc[arm]
        cells = [_mean_std(rows, key) for key in columns.values()]
        seeds = int(rows["seeds"].max())
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(rows: pd.DataFrame, key: str) -> str:
    if key not in rows.index:
        return "-"
    mean, std = rows.loc[key, "mean"], rows.loc[key, "std"]
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def write_seed_summary(arms: Mapping[str, Mapping[str, float]], out_dir: Path) -> list[Path]:
    """Write ``seeds.csv`` and ``seeds.md`` into ``out_dir``; their paths."""
    table = seed_table(arms)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / "seeds.csv", out_dir / "seeds.md"
    table.to_csv(csv)
    md.write_text(
        "# Held-out questions, mean ± std over seeds (percent; gain: with the image minus a blank one)\n\n"
        + heldout_markdown(table)
    )
    return [csv, md]
