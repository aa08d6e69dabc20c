"""Find stage runs in one or several MLflow stores: final metrics, params, tags and loss histories.

Backs ``maven compare`` (and ``tools/compare_runs.py``); works against any tracking URI (a run directory's
SQLite file, a tracking server) and merges several. Runs are the nested stage runs the tracker writes (tag
``maven.run_kind=stage``; evaluation runs are stage runs named ``eval-<model>``) unless run ids are given
explicitly. :func:`format_table` prints one column per run; :mod:`.report` turns the runs into one row
per launch (arm).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

STAGE_QUERY = "tags.`maven.run_kind` = 'stage'"
LAUNCH_QUERY = "tags.`maven.run_kind` = 'launch'"
EVAL_STAGE_PREFIX = "eval-"
INHERITED_TAGS = ("maven.sweep", "maven.arm")
"""Tags a stage run takes from its parent (launch) run when it does not carry them itself."""


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
    launch_id: str = ""
    """The ``maven.launch_id`` tag, or empty."""
    store: str = ""
    """The tracking URI the run was read from."""
    tags: dict[str, str] = field(default_factory=dict)
    """The run's tags, plus :data:`INHERITED_TAGS` from its parent run where it lacks them."""
    start_time: int = 0
    """Start time, ms since the epoch."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """``(step, value)`` per step, ascending, for the keys :func:`load_histories` was asked for."""

    @property
    def is_eval(self) -> bool:
        """An evaluation run (``maven eval``), not a training stage."""
        return self.stage.startswith(EVAL_STAGE_PREFIX)


def find_runs(
    uri: str,
    experiments: Sequence[str] = (),
    stages: Sequence[str] = (),
    launch_ids: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    sweep: str | None = None,
) -> list[RunSummary]:
    """Stage runs in ``experiments`` (default: all active ones) of one store, ordered by experiment, start
    time, stage; or exactly ``run_ids``. Raises ``ValueError`` for an unknown experiment or run id.

    Filters: ``stages`` keeps those stages, and the evaluation runs too unless it names an ``eval-*`` stage;
    ``launch_ids`` keeps those launches; ``sweep`` keeps the launches whose parent run or stage runs carry
    the tag ``maven.sweep=<sweep>``.
    """
    return find_runs_in_stores([uri], experiments, stages, launch_ids, run_ids, sweep)


def find_runs_in_stores(
    uris: Sequence[str],
    experiments: Sequence[str] = (),
    stages: Sequence[str] = (),
    launch_ids: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    sweep: str | None = None,
) -> list[RunSummary]:
    """:func:`find_runs` over several stores, store by store in the order given. An experiment or run id
    needs to be in one of them only; one that is in none raises ``ValueError``."""
    from maven_dist.train.tracking.client import mlflow_client

    found: list[RunSummary] = []
    missing_experiments = set(experiments)
    missing_runs = set(run_ids)
    for uri in uris:
        client = mlflow_client(uri)
        if run_ids:
            runs = [run for run in (_get_run(client, r) for r in run_ids) if run is not None]
            missing_runs -= {run.info.run_id for run in runs}
            parent_ids = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
            parents = {_launch_key(p): p for p in (_get_run(client, p) for p in parent_ids) if p is not None}
        else:
            exps = _experiments(client, experiments)
            missing_experiments -= {e.name for e in exps}
            exp_ids = [e.experiment_id for e in exps]
            runs = _search(client, exp_ids, STAGE_QUERY)
            parents = {_launch_key(r): r for r in _search(client, exp_ids, LAUNCH_QUERY)}
            runs = _filtered(runs, parents, stages, launch_ids, sweep)
        found += _summaries(client, uri, runs, parents)
    if missing_experiments:
        raise ValueError(f"no experiment named {sorted(missing_experiments)} in {', '.join(uris)}")
    if missing_runs:
        raise ValueError(f"no run {sorted(missing_runs)} in {', '.join(uris)}")
    return found


def load_histories(runs: Iterable[RunSummary], keys: Sequence[str]) -> None:
    """Fill ``run.history[key]`` from the store for every ``key`` the run has. A step logged more than
    once (a resumed stage repeats the steps after its checkpoint) keeps its latest value."""
    from maven_dist.train.tracking.client import mlflow_client

    clients = {}
    for run in runs:
        if run.store not in clients:
            clients[run.store] = mlflow_client(run.store)
        client = clients[run.store]
        for key in keys:
            if key not in run.metrics:
                continue
            latest: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(run.run_id, key):
                if m.step not in latest or m.timestamp >= latest[m.step][0]:
                    latest[m.step] = (m.timestamp, m.value)
            run.history[key] = [(step, latest[step][1]) for step in sorted(latest)]


def store_name(uri: str) -> str:
    """A short name for a store: the run directory of ``sqlite:///RUN_DIR/mlflow.db``, the database file
    of other SQLite stores, ``host:port`` of a server (never its credentials: the name goes into reports)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(parsed.path)
        return path.parent.name if path.name == "mlflow.db" else path.name
    if parsed.hostname:
        return f"{parsed.hostname}:{parsed.port}" if parsed.port else parsed.hostname
    return uri


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _experiments(client, names: Sequence[str]) -> list:
    if not names:
        return client.search_experiments()
    return [e for e in (client.get_experiment_by_name(n) for n in names) if e is not None]


def _search(client, exp_ids: list[str], query: str) -> list:
    if not exp_ids:
        return []
    return client.search_runs(exp_ids, filter_string=query, max_results=10_000, order_by=["start_time ASC"])


def _launch_key(run) -> tuple[str, str]:
    return run.info.experiment_id, run.data.tags.get("maven.launch_id", "")


def _filtered(runs: list, parents: dict, stages: Sequence[str], launch_ids: Sequence[str], sweep: str | None):
    names_eval = any(s.startswith(EVAL_STAGE_PREFIX) for s in stages)

    def stage_kept(stage: str) -> bool:
        return not stages or stage in stages or (stage.startswith(EVAL_STAGE_PREFIX) and not names_eval)

    if sweep is not None:
        swept = {key for key, p in parents.items() if p.data.tags.get("maven.sweep") == sweep}
        swept |= {_launch_key(r) for r in runs if r.data.tags.get("maven.sweep") == sweep}
        runs = [r for r in runs if _launch_key(r) in swept]
    return [
        r
        for r in runs
        if stage_kept(r.data.tags.get("maven.stage", ""))
        and (not launch_ids or r.data.tags.get("maven.launch_id") in launch_ids)
    ]


def _summaries(client, uri: str, runs: list, parents: dict) -> list[RunSummary]:
    names: dict[str, str] = {}
    out = []
    for run in runs:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        tags = dict(run.data.tags)
        parent = parents.get(_launch_key(run))
        for key in INHERITED_TAGS:
            if key not in tags and parent is not None and key in parent.data.tags:
                tags[key] = parent.data.tags[key]
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
                launch_id=tags.get("maven.launch_id", ""),
                store=uri,
                tags=tags,
                start_time=run.info.start_time or 0,
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
