"""The comparison report (``maven compare``, the sweep's report): the stage runs the tracker writes (tag
``maven.run_kind=stage``; an evaluation is a stage named ``eval-<model>``), read from any number of MLflow
stores with ``mlflow.search_runs`` into pandas; one row per arm (launch) in text, Markdown, CSV and HTML with
plots, as docs/experiments.md ("Comparing runs") describes; and the summary a launch's parent run carries."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pandas as pd

from maven_dist.contract.lengths import image_tokens

from .client import mlflow_client, sqlite_path
from .run_info import PARAM_LIMIT, clip, flatten_params

TRAIN_LOSS, VAL_LOSS, TOKENS_PER_S = "loss/total", "val/loss", "perf/tokens_per_s"
HISTORY_KEYS = (TRAIN_LOSS, VAL_LOSS, TOKENS_PER_S)  # the histories the report reads (load_histories)
PER_LAUNCH_PARAMS = ("run_dir", "recipe_fingerprint")  # differ in every launch: no column unless asked for
SUMMARY_METRICS = ("loss/total", "val/loss", "val/loss_text", "val/loss_visual_codes", "val/visual_gain",
                   "perf/tokens_per_s", "perf/samples_per_s", "selector/h_eos_spread")  # fmt: skip
"""The parent run gets ``<stage>/<key>``: each stage's last value (and ``<stage>/val/loss_best``)."""
INHERITED_TAGS = ("maven.sweep", "maven.arm")  # a stage run takes them from its parent run if it lacks them


@dataclass
class RunSummary:
    """A stage run of the store at ``store``: ``metrics`` the latest value of each, ``start_time`` in ms since
    the epoch, ``history`` the ``(step, value)`` points by step of the keys :func:`load_histories` loaded."""

    run_id: str
    stage: str
    experiment: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    launch_id: str = ""
    store: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    start_time: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def find_runs_in_stores(uris: Sequence[str], experiments: Sequence[str] = (), stages: Sequence[str] = (),
                        launch_ids: Sequence[str] = (), sweep: str | None = None
                        ) -> list[RunSummary]:  # fmt: skip
    """Stage runs of ``experiments`` (default: all active ones), store by store, then by start time.
    ``stages`` keeps those stages (and the evaluations unless it names an ``eval-*`` one), ``launch_ids``
    those launches, ``sweep`` the launches whose parent or stage runs carry ``maven.sweep=<sweep>``. Raises
    ``ValueError`` for an experiment in none of the stores."""
    found, missing = [], set(experiments)
    for uri in uris:
        frame, names = _search(uri, experiments)
        missing -= set(names.values())
        if frame.empty:
            continue
        tags = frame.reindex(columns=[f"tags.maven.{k}" for k in ("run_kind", "stage", "launch_id", "sweep")])
        kind, stage, launch_id, sweep_tag = (column.fillna("") for _, column in tags.items())
        launch = frame["experiment_id"] + "/" + launch_id
        evals = stage.str.startswith("eval-") & (not any(s.startswith("eval-") for s in stages))
        keep = (kind == "stage") & ((stage.isin(stages) | evals) if stages else True)
        keep &= launch_id.isin(launch_ids) if launch_ids else True
        keep &= launch.isin(set(launch[sweep_tag == sweep])) if sweep is not None else True
        parents = {launch[i]: _prefixed(row, "tags.") for i, row in frame[kind == "launch"].iterrows()}
        for i, row in frame[keep].iterrows():
            tags = {k: v for k, v in parents.get(launch[i], {}).items() if k in INHERITED_TAGS}
            start = 0 if pd.isna(row["start_time"]) else int(row["start_time"].timestamp() * 1000)
            found.append(RunSummary(row["run_id"], stage[i], names[row["experiment_id"]], row["status"],
                                    _prefixed(row, "metrics."), _prefixed(row, "params."), launch_id[i], uri,
                                    tags | _prefixed(row, "tags."), start))  # fmt: skip
    if missing:
        raise ValueError(f"no experiment named {sorted(missing)} in {', '.join(uris)}")
    return found


def load_histories(runs: Iterable[RunSummary], keys: Sequence[str]) -> None:
    """Fill ``run.history[key]`` for each ``key`` the run has; a step logged twice (a resumed stage repeats
    the steps after its checkpoint) keeps its latest value."""
    for run in runs:
        client = mlflow_client(run.store)
        for key in (k for k in keys if k in run.metrics):
            points = sorted(client.get_metric_history(run.run_id, key), key=lambda m: (m.step, m.timestamp))
            run.history[key] = sorted({m.step: m.value for m in points}.items())


def store_name(uri: str) -> str:
    """A short name for a store: the run directory of ``sqlite:///RUN_DIR/mlflow.db``, the file of another
    SQLite store, ``host:port`` of a server (never its credentials: the name goes into reports)."""
    if path := sqlite_path(uri):
        return path.parent.name if path.name == "mlflow.db" else path.name
    return urlparse(uri).netloc.rpartition("@")[2] or uri  # host:port, less any user:password@


@dataclass
class Arm:
    """A launch's training ``stages`` (in start order) and ``evals``; :func:`group_arms` names it."""

    label: str
    store: str
    experiment: str
    launch_id: str
    stages: list[RunSummary]
    evals: list[RunSummary]

    def stage(self, name: str) -> RunSummary | None:
        return next((r for r in self.stages if r.stage == name), None)

    def eval_metrics(self) -> dict[str, float]:
        return {k: v for run in self.evals for k, v in run.metrics.items() if k.startswith("eval/")}


class Report(NamedTuple):
    """One row per arm (the columns: docs/experiments.md, "Comparing runs"), and ``per_stage`` val/loss."""

    main: pd.DataFrame
    per_stage: pd.DataFrame


def group_arms(runs: Sequence[RunSummary]) -> list[Arm]:
    """One :class:`Arm` per (store, experiment, launch), in the order the runs come, named by its
    ``maven.arm`` tag, else its launch id (plus the store, then the experiment, where two read the same)."""
    groups: dict[tuple[str, str, str], list[RunSummary]] = {}
    for run in runs:
        groups.setdefault((run.store, run.experiment, run.launch_id), []).append(run)
    arms = []
    for (store, experiment, launch), members in groups.items():
        members = sorted(members, key=lambda r: r.start_time)
        label = next((r.tags["maven.arm"] for r in members if "maven.arm" in r.tags), launch)
        stages = [r for r in members if not r.stage.startswith("eval-")]
        evals = [r for r in members if r.stage.startswith("eval-")]
        arms.append(Arm(label, store, experiment, launch, stages, evals))
    for qualifier in (lambda a: store_name(a.store), lambda a: a.experiment, lambda a: a.launch_id):
        counts = pd.Series([a.label for a in arms]).value_counts()
        for arm in arms:
            arm.label = f"{arm.label} @ {qualifier(arm)}" if counts[arm.label] > 1 else arm.label
    return arms


def build_report(arms: Sequence[Arm], all_params: bool = False) -> Report:
    """Both tables (a missing cell is None)."""
    several_stores, params = len({a.store for a in arms}) > 1, param_columns(arms, all_params)
    eval_keys = sorted({k for a in arms for k in a.eval_metrics()})
    main, per_stage = [], []
    for i, arm in enumerate(arms):
        last, evals = arm.stages[-1] if arm.stages else None, arm.eval_metrics()
        row = {"arm": arm.label} | ({"store": store_name(arm.store)} if several_stores else {})
        row["last stage"] = last and (last.stage + ("" if last.status == "FINISHED" else f" ({last.status})"))
        row |= {header: values[i] for header, values in params}
        row[f"{VAL_LOSS} final"], row[f"{VAL_LOSS} best"] = final_and_best(last, VAL_LOSS)
        row |= {k: evals.get(k) for k in eval_keys}
        row["visual tokens/image"] = visual_tokens(last.params) if last else None
        row["tokens/s"] = tokens_per_s(last)
        main.append(row)
        per_stage.append({"arm": arm.label})
        for s in stage_order(arms):
            if (run := arm.stage(s)) is not None and VAL_LOSS in run.metrics:
                final, best = final_and_best(run, VAL_LOSS)
                per_stage[-1] |= {f"{s} {VAL_LOSS} final": final, f"{s} {VAL_LOSS} best": best}
    frames = (pd.DataFrame(rows, dtype=object).replace({float("nan"): None}) for rows in (main, per_stage))
    return Report(*frames)


def param_columns(arms: Sequence[Arm], all_params: bool = False) -> list[tuple[str, list[str | None]]]:
    """``(header, a value per arm)`` for each param that differs between arms (each with ``all_params``)."""
    stages, columns = stage_order(arms), []
    for key in sorted({k for a in arms for r in a.stages for k in r.params}):
        by_arm = [{r.stage: r.params.get(key) for r in a.stages} for a in arms]
        at = {s: [values[s] for values in by_arm if s in values] for s in stages}
        if all_params:
            where = [s for s in stages if any(v is not None for v in at[s])]
        else:
            where = [] if key in PER_LAUNCH_PARAMS else [s for s in stages if len(set(at[s])) > 1]
        if where and all(len(set(values.values())) <= 1 for values in by_arm):
            columns.append((key, [next(iter(values.values()), None) for values in by_arm]))
        else:
            columns += [(f"{key} [{s}]", [values.get(s) for values in by_arm]) for s in where]
    return columns


def stage_order(arms: Sequence[Arm]) -> list[str]:
    """Training stage names in the order the arms ran them (first seen first)."""
    return list(dict.fromkeys(r.stage for arm in arms for r in arm.stages))


def final_and_best(run: RunSummary | None, key: str) -> tuple[float | None, float | None]:
    """The value at the last step and the lowest, from the run's history (else its latest value)."""
    points = run.history.get(key) if run else None
    if points:
        return points[-1][1], min(v for _, v in points)
    return (run.metrics.get(key),) * 2 if run else (None, None)


def tokens_per_s(run: RunSummary | None) -> float | None:
    """The median ``perf/tokens_per_s`` over the run's logged windows (else its latest value)."""
    points = run.history.get(TOKENS_PER_S) if run else None
    return statistics.median(v for _, v in points) if points else run and run.metrics.get(TOKENS_PER_S)


def visual_tokens(params: dict[str, str]) -> int | None:
    """The paper's visual tokens per image from a stage run's params; None when one it needs is missing."""
    try:
        patches = (int(params["model.vision.image_size"]) // int(params["model.vision.patch_size"])) ** 2
        keep, views = float(params["model.selector.keep_ratio"]), json.loads(params["stage.views"])
        return image_tokens(int(params["model.discrete.num_codes"]), patches, keep, views)
    except (KeyError, ValueError, TypeError):
        return None


def to_text(report: Report, width: int = 24) -> str:
    """Both tables as aligned plain text, cells cut to ``width`` characters (headers whole)."""
    if report.main.empty:
        return "no runs found"
    cut = lambda v: _str(v) if len(_str(v)) <= width else _str(v)[: width - 1] + "…"  # noqa: E731
    return "\n\n".join(t.map(cut).to_string(index=False, justify="left") for t in _tables(report))


def to_markdown(report: Report, plot_links: Sequence[str] = ()) -> str:
    """Both tables as Markdown (a cell's HTML escaped, since Markdown renders it), then the plots."""
    cell = lambda v: html.escape(_str(v), quote=False).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["# Run comparison"]
    for title, table in zip(["", f"## {VAL_LOSS} per stage"], _tables(report), strict=False):
        out += [title, table.map(cell).rename(columns=cell).to_markdown(index=False, tablefmt="pipe")]
    if plot_links:
        out += ["## Curves"] + [f"![{Path(link).stem}]({link})" for link in plot_links]
    return "\n\n".join(filter(None, out)) + "\n"


def to_csv(report: Report) -> str:
    """One row per arm: the main table's columns, then the per-stage ``val/loss`` columns; numbers in full."""
    both = pd.concat([report.main, report.per_stage.drop(columns="arm")], axis=1)
    return both.to_csv(index=False, lineterminator="\n")


def to_html(report: Report, images: Mapping[str, bytes]) -> str:
    """A self-contained page: both tables and the plots as base64 PNG. pandas escapes every cell (params and
    tags are whatever the recipe or the user put there)."""
    out = ['<!DOCTYPE html><html><head><meta charset="utf-8"><title>Run comparison</title></head><body>']
    for title, table in zip(["Run comparison", f"{VAL_LOSS} per stage"], _tables(report), strict=False):
        out += [f"<h1>{html.escape(title)}</h1>", table.map(_str).to_html(index=False)]
    for name, png in images.items():
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        out.append(f'<div><img alt="{html.escape(name)}" src="{src}"></div>')
    return "\n".join([*out, "</body></html>"]) + "\n"


def render_plots(arms: Sequence[Arm]) -> dict[str, bytes]:
    """``{file name: PNG}``: per training stage, ``loss/total`` and ``val/loss`` of all arms overlaid (from
    the loaded histories). matplotlib's object API: pyplot's global figure state is not for a library."""
    from matplotlib.figure import Figure

    images = {}
    for stage, key in ((s, k) for s in stage_order(arms) for k in (TRAIN_LOSS, VAL_LOSS)):
        series = {a.label: r.history[key] for a in arms if (r := a.stage(stage)) and r.history.get(key)}
        if not series:
            continue
        fig = Figure(figsize=(7, 3), layout="constrained")
        ax = fig.add_subplot(title=f"{stage}: {key}", xlabel="step")
        for label, points in series.items():  # markers where points are few (val/loss)
            marker = "o" if len(points) <= 20 else None
            ax.plot(*zip(*points, strict=True), linewidth=1.2, marker=marker, label=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(png := io.BytesIO(), format="png", dpi=100)
        images[re.sub(r"[^\w.-]+", "_", f"{stage}_{key}.png")] = png.getvalue()
    return images


def write_plots(images: Mapping[str, bytes], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        (directory / name).write_bytes(png)
    return [directory / name for name in images]


def write_report(arms: Sequence[Arm], out_dir: Path) -> list[Path]:
    """``report.html``, ``report.md``, ``report.csv`` and ``plots/*.png`` in ``out_dir``; their paths."""
    report, images = build_report(arms), render_plots(arms)
    plots = write_plots(images, out_dir / "plots")
    files = {"report.html": to_html(report, images), "report.csv": to_csv(report),
             "report.md": to_markdown(report, [f"plots/{p.name}" for p in plots])}  # fmt: skip
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files] + plots


def summarise_launch(uri: str, experiment: str, launch_id: str, name: str, config: Mapping, recipe: str,
                     order: Sequence[str]) -> None:  # fmt: skip
    """Name a launch's parent run ``name``; give it as params what it lacks of the resolved ``config`` (less
    the per-stage keys), ``recipe`` and the stages in ``order``; and, as metrics, each stage's
    :data:`SUMMARY_METRICS` and every ``eval/*`` (docs/experiments.md, "Comparing runs"; ``maven pipeline``)."""
    from mlflow.entities import Metric, Param

    runs = find_runs_in_stores([uri], [experiment], launch_ids=[launch_id])
    parent = next((r.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.tags), None)
    if parent is None:
        return
    load_histories(runs, (VAL_LOSS,))
    (arm,) = group_arms(runs)
    metrics = arm.eval_metrics()
    for run in arm.stages:
        metrics |= {f"{run.stage}/{k}": run.metrics[k] for k in SUMMARY_METRICS if k in run.metrics}
        if VAL_LOSS in run.metrics:
            metrics[f"{run.stage}/{VAL_LOSS}_best"] = final_and_best(run, VAL_LOSS)[1]
    params = flatten_params({k: v for k, v in config.items() if k not in ("stage", "demo")})
    params |= {"recipe": recipe, "stages": ",".join(order)}
    client, now = mlflow_client(uri), int(time.time() * 1000)
    client.set_tag(parent, "mlflow.runName", name)
    logged = client.get_run(parent).data.params
    params = [Param(k, v) for k, v in clip(params, PARAM_LIMIT).items() if k not in logged]
    client.log_batch(parent, [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())], params)


def _tables(report: Report) -> list[pd.DataFrame]:
    return [report.main] + ([report.per_stage] if report.per_stage.shape[1] > 1 else [])


def _str(value: object) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _search(uri: str, experiments: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """``mlflow.search_runs`` over ``experiments`` (all active ones if none), and their names by id."""
    import mlflow

    client = mlflow_client(uri)  # opens (creates, migrates) a SQLite store under its lock
    found = [client.get_experiment_by_name(n) for n in experiments] or client.search_experiments()
    if not (names := {e.experiment_id: e.name for e in found if e is not None}):
        return pd.DataFrame(), names
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # search_runs reads the process's tracking URI
    try:
        return mlflow.search_runs(list(names), order_by=["start_time ASC"]), names
    finally:
        mlflow.set_tracking_uri(previous)


def _prefixed(row: pd.Series, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in row.dropna().items() if k.startswith(prefix)}
