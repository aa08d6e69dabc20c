"""The sweep's comparison report: every arm's runs from the sweep's store, written under ``ROOT/report/``
and logged as artifacts of the sweep's own MLflow run (tag ``maven.run_kind=sweep``). The arms' parent
runs carry their headline numbers as metrics (``maven pipeline`` summarises each launch), so the MLflow
run table compares the arms too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from maven_dist.sweep.runner import SHARED, tracking_uri
from maven_dist.sweep.spec import Sweep, arm_group

SWEEP_KIND = "sweep"
ARM_TAG = "maven.arm"
CURVES = ("loss/total", "val/loss")


def report_sweep(sweep: Sweep, root: Path) -> Path | None:
    """Write and log the report; its folder, or None when the store holds no run of the sweep yet."""
    from maven_dist.sweep.seeds import write_seed_summary
    from maven_dist.train.tracking.report import (
        find_runs_in_stores,
        group_arms,
        load_histories,
        write_report,
    )

    uri = tracking_uri(sweep, root)
    try:
        runs = find_runs_in_stores([uri], [sweep.experiment], sweep=sweep.name)
    except ValueError as exc:  # no experiment yet: nothing ran
        print(f"[sweep] no report: {exc}", file=sys.stderr)
        return None
    runs = [r for r in runs if r.tags.get(ARM_TAG) != SHARED]  # the stages every arm started from
    if not runs:
        print(f"[sweep] no report: no run of sweep {sweep.name}'s arms in {uri}", file=sys.stderr)
        return None
    load_histories(runs, CURVES)
    arms = group_arms(runs)
    out = root / "report"
    paths = write_report(arms, out)
    if any(arm_group(a.label) != a.label for a in arms):  # a seeds: sweep: each arm's mean and std too
        paths += write_seed_summary({a.label: a.eval_metrics() for a in arms}, out)
    run_id = sweep_run(uri, sweep)
    log_report(uri, run_id, paths)
    print(
        f"[sweep] report of {len(arms)} arms: {out / 'report.html'} (also in MLflow run {run_id})", flush=True
    )
    return out


def log_report(uri: str, run_id: str, paths: list[Path]) -> None:
    """Attach the report's files to run ``run_id`` under ``report/`` (the PNGs under ``report/plots``)."""
    from maven_dist.train.tracking.client import mlflow_client

    client = mlflow_client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), "report/plots" if path.suffix == ".png" else "report")


def sweep_run(uri: str, sweep: Sweep) -> str:
    """The sweep's own run in its experiment (created once, found again by its tags on a rerun)."""
    from maven_dist.train.tracking.client import mlflow_client

    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(sweep.experiment)
    query = f"tags.`maven.run_kind` = '{SWEEP_KIND}' and tags.`maven.sweep` = '{sweep.name}'"
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"maven.run_kind": SWEEP_KIND, "maven.sweep": sweep.name, "maven.sweep_file": str(sweep.path)}
    run = client.create_run(exp_id, tags=tags, run_name=f"sweep {sweep.name}")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
