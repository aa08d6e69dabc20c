"""The comparison report: one row per arm (launch) over stage runs read from any number of stores.

An *arm* is one launch: the stage runs and ``eval-*`` runs sharing a store, an experiment and a
``maven.launch_id``. Its label is the ``maven.arm`` tag a sweep sets, else the launch id, plus the store
(then the experiment) where two arms would read the same. For every arm the main table shows

* the params that differ between arms, compared stage by stage (each stage against the same stage of the
  other arms), so a param whose value changes from stage to stage within every arm, like
  ``stage.optimizer.lr``, is not an arm difference by itself. A differing param is one column when each arm
  has one value for it over all its stages (``model.selector.keep_ratio``), else one column per stage in
  which the arms differ (``stage.optimizer.lr [stage3]``). ``run_dir`` and ``recipe_fingerprint`` are left
  out (:data:`PER_LAUNCH_PARAMS`) unless ``all_params``, which shows every param;
* the last training stage (the one started last), its final and best (lowest) ``val/loss`` and its
  median ``perf/tokens_per_s`` over the logged windows (the median, so that the warm-up window and a short
  last window do not decide it);
* every ``eval/<task>/<metric>`` of the arm's evaluation runs (where two evaluation runs of one arm log the
  same key, the one started later wins);
* the visual tokens per image under the last stage's params, counted as the paper counts them: the codes
  (``stage.views`` with ``discrete``) plus ``floor(keep_ratio * patches)`` kept patches (``continuous``),
  89 / 176 / 608 at 336 px (:func:`~maven_dist.contract.lengths.image_tokens`; the sequence adds
  ``<img>`` and ``</img>``);

a second table gives the final and best ``val/loss`` of every training stage, and the plots overlay the
``loss/total`` and the ``val/loss`` curves of all arms, one image per stage and metric.

Everything here works on :class:`~.compare.RunSummary` objects and touches no store except
:func:`log_report`. The sweep launcher's use::

    runs = find_runs_in_stores([uri], sweep=name)
    load_histories(runs, HISTORY_KEYS)
    log_report(uri, parent_run_id, write_report(group_arms(runs), out_dir))
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maven_dist.contract.lengths import image_tokens

from .compare import RunSummary, store_name

TRAIN_LOSS = "loss/total"
VAL_LOSS = "val/loss"
TOKENS_PER_S = "perf/tokens_per_s"
HISTORY_KEYS = (TRAIN_LOSS, VAL_LOSS, TOKENS_PER_S)
"""The metric histories the report reads (:func:`~.compare.load_histories`)."""
PER_LAUNCH_PARAMS = ("run_dir", "recipe_fingerprint")
"""Params that say nothing about an arm: each launch has its own run_dir, and the recipe's fingerprint
differs wherever any param differs (those params are the columns)."""

Cell = str | int | float | None


@dataclass
class Arm:
    label: str
    """The ``maven.arm`` tag, else the launch id; the store (then the experiment) added where ambiguous."""
    store: str
    """Tracking URI of the store the runs were read from."""
    experiment: str
    """Experiment name."""
    launch_id: str
    """The launch (parent run) the stage runs belong to."""
    stages: list[RunSummary] = field(default_factory=list)
    """Training stage runs, in start order."""
    evals: list[RunSummary] = field(default_factory=list)
    """Evaluation (``eval-*``) runs, in start order."""

    @property
    def last(self) -> RunSummary | None:
        """The training stage started last."""
        return self.stages[-1] if self.stages else None

    def stage(self, name: str) -> RunSummary | None:
        return next((r for r in self.stages if r.stage == name), None)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class Report:
    main: Table
    """One row per arm: differing params, last stage's val/loss, eval metrics, positions, throughput."""
    per_stage: Table
    """One row per arm: final and best val/loss of every training stage that logged it."""


def group_arms(runs: Sequence[RunSummary]) -> list[Arm]:
    """One :class:`Arm` per (store, experiment, launch), in the order the runs come; a run without a
    launch id (given by run id, not written by the tracker) is an arm of its own."""
    groups: dict[tuple[str, str, str], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault((run.store, run.experiment, run.launch_id or run.run_id), []).append(run)
    arms = []
    for (store, experiment, launch), members in groups.items():
        members = sorted(members, key=lambda r: r.start_time)
        label = next((r.tags["maven.arm"] for r in members if "maven.arm" in r.tags), launch)
        arms.append(
            Arm(
                label=label,
                store=store,
                experiment=experiment,
                launch_id=launch,
                stages=[r for r in members if not r.is_eval],
                evals=[r for r in members if r.is_eval],
            )
        )
    _disambiguate(arms, lambda a: store_name(a.store))
    _disambiguate(arms, lambda a: a.experiment)
    _disambiguate(arms, lambda a: a.launch_id)
    return arms


def build_report(arms: Sequence[Arm], all_params: bool = False) -> Report:
    """The two tables of the module docstring."""
    params = param_columns(arms, all_params)
    eval_keys = sorted({k for a in arms for k in _eval_metrics(a)})
    several_stores = len({a.store for a in arms}) > 1
    header = ["arm"] + (["store"] if several_stores else []) + ["last stage"] + [h for h, _ in params]
    header += [f"{VAL_LOSS} final", f"{VAL_LOSS} best", *eval_keys, "visual tokens/image", "tokens/s"]
    rows = []
    for i, arm in enumerate(arms):
        last = arm.last
        final, best = final_and_best(last, VAL_LOSS) if last else (None, None)
        evals = _eval_metrics(arm)
        row: list[Cell] = [arm.label] + ([store_name(arm.store)] if several_stores else [])
        row.append(_stage_cell(last))
        row += [values[i] for _, values in params]
        row += [final, best, *(evals.get(k) for k in eval_keys)]
        row += [visual_tokens(last.params) if last else None, tokens_per_s(last) if last else None]
        rows.append(row)

    stages = [s for s in stage_order(arms) if any((r := a.stage(s)) and VAL_LOSS in r.metrics for a in arms)]
    stage_header = ["arm"] + [f"{s} {VAL_LOSS} {which}" for s in stages for which in ("final", "best")]
    stage_rows = [
        [arm.label] + [v for s in stages for v in _final_and_best_of(arm.stage(s), VAL_LOSS)] for arm in arms
    ]
    return Report(Table(header, rows), Table(stage_header, stage_rows))


def param_columns(arms: Sequence[Arm], all_params: bool = False) -> list[tuple[str, list[str | None]]]:
    """``(header, one value per arm)`` for every param that differs between arms (every param with
    ``all_params``), compared stage by stage as the module docstring says."""
    stages = stage_order(arms)
    keys = sorted({k for a in arms for r in a.stages for k in r.params})
    columns: list[tuple[str, list[str | None]]] = []
    for key in keys:
        if all_params:
            where = [s for s in stages if any((r := a.stage(s)) and key in r.params for a in arms)]
        elif key in PER_LAUNCH_PARAMS:
            continue
        else:
            where = [s for s in stages if _differs(arms, s, key)]
        if not where:
            continue
        per_arm = [{r.params.get(key) for r in a.stages} for a in arms]
        if all(len(values) <= 1 for values in per_arm):
            columns.append((key, [next(iter(values), None) for values in per_arm]))
        else:
            columns += [(f"{key} [{s}]", [_param(a, s, key) for a in arms]) for s in where]
    return columns


def stage_order(arms: Sequence[Arm]) -> list[str]:
    """Training stage names in the order the arms ran them (first seen first)."""
    names: dict[str, None] = {}
    for arm in arms:
        names.update(dict.fromkeys(r.stage for r in arm.stages))
    return list(names)


def final_and_best(run: RunSummary, key: str) -> tuple[float | None, float | None]:
    """The value at the last step and the lowest value, from the run's history (else its latest value)."""
    points = run.history.get(key)
    if points:
        return points[-1][1], min(v for _, v in points)
    value = run.metrics.get(key)
    return value, value


def tokens_per_s(run: RunSummary) -> float | None:
    """Median ``perf/tokens_per_s`` over the run's logged windows (else its latest value)."""
    points = run.history.get(TOKENS_PER_S)
    if points:
        return statistics.median(v for _, v in points)
    return run.metrics.get(TOKENS_PER_S)


def visual_tokens(params: dict[str, str]) -> int | None:
    """The paper's visual tokens per image from a stage run's params; None when a param it needs is missing."""
    try:
        patches = (int(params["model.vision.image_size"]) // int(params["model.vision.patch_size"])) ** 2
        return image_tokens(
            int(params["model.discrete.num_codes"]),
            patches,
            float(params["model.selector.keep_ratio"]),
            json.loads(params["stage.views"]),
        )
    except (KeyError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- formats


def to_text(report: Report, width: int = 24) -> str:
    """Both tables as aligned plain text, cells cut to ``width`` characters."""
    if not report.main.rows:
        return "no runs found"
    parts = [_text_table(report.main, width)]
    if len(report.per_stage.header) > 1:
        parts.append(_text_table(report.per_stage, width))
    return "\n\n".join(parts)


def to_markdown(report: Report, plot_links: Sequence[str] = ()) -> str:
    """Both tables as Markdown, then the plots as images at ``plot_links`` (paths relative to the file)."""
    out = ["# Run comparison", "", _md_table(report.main)]
    if len(report.per_stage.header) > 1:
        out += ["", f"## {VAL_LOSS} per stage", "", _md_table(report.per_stage)]
    if plot_links:
        out += ["", "## Curves", ""] + [f"![{Path(link).stem}]({link})" for link in plot_links]
    return "\n".join(out) + "\n"


def to_csv(report: Report) -> str:
    """One row per arm: the main table's columns, then the per-stage ``val/loss`` columns; numbers in full."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(report.main.header + report.per_stage.header[1:])
    for row, stage_row in zip(report.main.rows, report.per_stage.rows, strict=True):
        writer.writerow(["" if v is None else str(v) for v in row + stage_row[1:]])
    return buffer.getvalue()


def to_html(report: Report, images: dict[str, bytes] | None = None) -> str:
    """A self-contained page: both tables and the plots embedded as base64 PNG. Every value is escaped
    (params and tags are whatever the recipe or the user put there)."""
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Run comparison</title>',
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}</style>",
        "</head><body>",
        "<h1>Run comparison</h1>",
        _html_table(report.main),
    ]
    if len(report.per_stage.header) > 1:
        out += [f"<h2>{html.escape(VAL_LOSS)} per stage</h2>", _html_table(report.per_stage)]
    if images:
        out.append("<h2>Curves</h2>")
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<div><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots and files


def render_plots(arms: Sequence[Arm]) -> dict[str, bytes]:
    """``{file name: PNG}``: per training stage, ``loss/total`` and ``val/loss`` of all arms overlaid
    (from the histories :func:`~.compare.load_histories` loaded); a stage/metric no arm has is skipped."""
    images = {}
    for stage in stage_order(arms):
        for key in (TRAIN_LOSS, VAL_LOSS):
            series = {}
            for arm in arms:
                run = arm.stage(stage)
                if run is not None and run.history.get(key):
                    series[arm.label] = run.history[key]
            if series:
                images[f"{_file_safe(stage)}_{_file_safe(key)}.png"] = _overlay(
                    series, f"{stage}: {key}", key
                )
    return images


def write_plots(images: dict[str, bytes], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in images.items():
        (directory / name).write_bytes(png)
        paths.append(directory / name)
    return paths


def write_report(arms: Sequence[Arm], out_dir: Path, all_params: bool = False) -> list[Path]:
    """``report.html``, ``report.md``, ``report.csv`` and ``plots/*.png`` in ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(arms, all_params)
    images = render_plots(arms)
    plots = write_plots(images, out_dir / "plots")
    files = {
        "report.html": to_html(report, images),
        "report.md": to_markdown(report, [f"plots/{p.name}" for p in plots]),
        "report.csv": to_csv(report),
    }
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files] + plots


def log_report(uri: str, run_id: str, paths: Sequence[Path], artifact_path: str = "report") -> None:
    """Log the report files as artifacts of run ``run_id`` in the store at ``uri``: under
    ``artifact_path``, the PNGs under ``artifact_path/plots`` (the layout :func:`write_report` writes)."""
    from maven_dist.train.tracking.client import mlflow_client

    client = mlflow_client(uri)
    for path in paths:
        where = f"{artifact_path}/plots" if path.suffix == ".png" else artifact_path
        client.log_artifact(run_id, str(path), artifact_path=where)


# --------------------------------------------------------------------------- helpers


def _disambiguate(arms: Sequence[Arm], qualifier) -> None:
    counts: dict[str, int] = {}
    for arm in arms:
        counts[arm.label] = counts.get(arm.label, 0) + 1
    for arm in arms:
        if counts[arm.label] > 1:
            arm.label = f"{arm.label} @ {qualifier(arm)}"


def _differs(arms: Sequence[Arm], stage: str, key: str) -> bool:
    values = [r.params.get(key) for a in arms if (r := a.stage(stage)) is not None]
    return len(values) > 1 and len(set(values)) > 1


def _param(arm: Arm, stage: str, key: str) -> str | None:
    run = arm.stage(stage)
    return None if run is None else run.params.get(key)


def _eval_metrics(arm: Arm) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for run in arm.evals:
        metrics.update({k: v for k, v in run.metrics.items() if k.startswith("eval/")})
    return metrics


def _final_and_best_of(run: RunSummary | None, key: str) -> tuple[float | None, float | None]:
    return final_and_best(run, key) if run is not None else (None, None)


def _stage_cell(run: RunSummary | None) -> str | None:
    if run is None:
        return None
    return run.stage if run.status == "FINISHED" else f"{run.stage} ({run.status})"


def _str(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _text_table(table: Table, width: int) -> str:
    cells = [list(table.header)]  # headers whole: a cut param name would be ambiguous
    cells += [[_cut(_str(v), width) for v in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _md_table(table: Table) -> str:
    def line(cells: list[str]) -> str:
        # Markdown renders inline HTML: escape it, as in the HTML page.
        escaped = (html.escape(c, quote=False).replace("|", "\\|").replace("\n", " ") for c in cells)
        return "| " + " | ".join(escaped) + " |"

    lines = [line(table.header), "|" + "---|" * len(table.header)]
    return "\n".join(lines + [line([_str(v) for v in row]) for row in table.rows])


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_str(v))}</td>" for v in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _overlay(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> bytes:
    """One PNG with a line per arm. matplotlib's object API with the Agg canvas, as in :mod:`.loss_curve`:
    no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points in series.items():
        # Markers where there are few points (val/loss is computed every stage.eval_every steps).
        marker = "o" if len(points) <= 20 else None
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2, marker=marker, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
