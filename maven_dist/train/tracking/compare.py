"""Compare stage runs across launches and experiments: final metrics and the params that differ.

Backs ``tools/compare_runs.py``; works against any tracking URI (a run directory's SQLite file, a
tracking server). Runs are the nested stage runs the tracker writes (tag ``maven.run_kind=stage``) unless
run ids are given explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RunSummary:
    run_id: str
    """MLflow run id."""
    label: str
    """``<launch id>/<stage>`` (or the run name for runs not written by the tracker)."""
    stage: str
    """The ``maven.stage`` tag, or empty."""
    experiment: str
    """Experiment name."""
    status: str
    """RUNNING, FINISHED, FAILED or KILLED."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Latest value of every metric."""
    params: dict[str, str] = field(default_factory=dict)
    """All params."""


def find_runs(
    uri: str,
    experiments: Sequence[str] = (),
    stages: Sequence[str] = (),
    launch_ids: Sequence[str] = (),
    run_ids: Sequence[str] = (),
) -> list[RunSummary]:
    """Stage runs in ``experiments`` (default: all active ones), optionally only ``stages`` / ``launch_ids``;
    or exactly ``run_ids``. Ordered by experiment, start time, stage."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if experiments:
            exps = []
            for name in experiments:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise ValueError(f"no experiment named {name!r} in {uri}")
                exps.append(exp)
        else:
            exps = client.search_experiments()
        query = "tags.`maven.run_kind` = 'stage'"
        runs = []
        if exps:
            runs = client.search_runs(
                [e.experiment_id for e in exps],
                filter_string=query,
                max_results=10_000,
                order_by=["start_time ASC"],
            )
        runs = [
            r
            for r in runs
            if (not stages or r.data.tags.get("maven.stage") in stages)
            and (not launch_ids or r.data.tags.get("maven.launch_id") in launch_ids)
        ]
    names = {}
    out = []
    for run in runs:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        tags = run.data.tags
        if "maven.launch_id" in tags and "maven.stage" in tags:
            label = f"{tags['maven.launch_id']}/{tags['maven.stage']}"
        else:
            label = run.info.run_name or run.info.run_id
        out.append(
            RunSummary(
                run_id=run.info.run_id,
                label=label,
                stage=tags.get("maven.stage", ""),
                experiment=names[exp_id],
                status=run.info.status,
                metrics=dict(run.data.metrics),
                params=dict(run.data.params),
            )
        )
    return out


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    """Param keys whose value is not the same in every run (a missing param counts as a value)."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def format_table(
    runs: Sequence[RunSummary], metric_prefixes: Sequence[str] = (), all_params: bool = False, width: int = 24
) -> str:
    """A plain-text table, one column per run: experiment and status, final metrics (optionally only
    those starting with ``metric_prefixes``), then params that differ (or all with ``all_params``)."""
    if not runs:
        return "no runs found"
    metric_keys = sorted({k for r in runs for k in r.metrics})
    if metric_prefixes:
        metric_keys = [k for k in metric_keys if k.startswith(tuple(metric_prefixes))]
    param_keys = sorted({k for r in runs for k in r.params}) if all_params else differing_params(runs)

    # Column headers: just the stage when every run is from one launch, else launch/stage.
    launches = {r.label.rpartition("/")[0] for r in runs}
    one_launch = len(launches) == 1 and all(r.stage for r in runs)
    rows: list[list[str]] = [["run"] + [r.stage if one_launch else r.label for r in runs]]
    rows.append(["experiment"] + [r.experiment for r in runs])
    rows.append(["status"] + [r.status for r in runs])
    rows.append(["[final metrics]"] + [""] * len(runs))
    rows += [[k] + [_fmt(r.metrics.get(k)) for r in runs] for k in metric_keys]
    rows.append(["[params that differ]" if not all_params else "[params]"] + [""] * len(runs))
    rows += [[k] + [r.params.get(k, "-") for r in runs] for k in param_keys]
    if not param_keys:
        rows.append(["(none)"] + [""] * len(runs))

    key_width = max(len(row[0]) for row in rows)
    # Run labels keep their tail (the stage and the distinguishing end of the launch id).
    cells = [
        [rows[0][0].ljust(key_width)] + [_cut(c, width, keep_end=True).ljust(width) for c in rows[0][1:]]
    ]
    cells += [[row[0].ljust(key_width)] + [_cut(c, width).ljust(width) for c in row[1:]] for row in rows[1:]]
    return "\n".join("  ".join(row).rstrip() for row in cells)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _cut(text: str, width: int, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"
