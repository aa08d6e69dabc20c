"""The parent run of a launch, made worth opening: its name, the recipe's params, every stage's results.

The MLflow UI's run table shows parent runs; a sweep's arms are compared there without drilling into
the stage runs only if the parent carries what differs (params) and what came out (metrics):

* params: the recipe-level settings (the last stage's flattened config without its ``stage.*`` keys,
  which differ by stage), ``recipe`` and ``stages`` (the order they ran in);
* metrics: ``<stage>/<metric>`` = each stage run's last value of :data:`FINAL_METRICS`,
  ``<stage>/<metric>_best`` = the lowest of :data:`BEST_METRICS` over the stage, and every
  ``eval/<task>/<metric>`` of the launch's evaluation runs as it is.

Written by ``maven pipeline`` when its stages are done, through the store directly: the stage runs' metrics
are already there (the pipeline delivers the spool first). A store that cannot be reached loses only this
summary (a warning says so); rerunning the pipeline writes it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .run_info import MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL, clip_params
from .sender import PARENT_KIND, STAGE_KIND

FINAL_METRICS = (
    "loss/total",
    "val/loss",
    "val/loss_text",
    "val/loss_visual_codes",
    "perf/tokens_per_s",
    "perf/samples_per_s",
    "selector/h_eos_spread",
)
BEST_METRICS = ("val/loss",)
EVAL_PREFIX = "eval/"


def summary_metrics(stage_runs: list, history: Callable[[str, str], list[float]]) -> dict[str, float]:
    """The parent's metrics from the launch's stage and evaluation runs (`history(run_id, key)` -> values)."""
    out: dict[str, float] = {}
    for run in sorted(stage_runs, key=lambda r: r.info.start_time or 0):
        stage = run.data.tags.get("maven.stage", "")
        metrics = run.data.metrics
        if stage.startswith("eval-"):
            out.update({k: v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)})
            continue
        out.update({f"{stage}/{k}": metrics[k] for k in FINAL_METRICS if k in metrics})
        for key in BEST_METRICS:
            values = history(run.info.run_id, key) if key in metrics else []
            if values:
                out[f"{stage}/{key}_best"] = min(values)
    return out


def summarise_launch(
    uri: str, experiment: str, launch_id: str, name: str, params: Mapping[str, str]
) -> str | None:
    """Name the launch's parent run `name` and log `params` and :func:`summary_metrics` into it; its run id,
    or None when the launch has no parent run in the store."""
    from mlflow.entities import Metric, Param

    from maven_dist.train.tracking.client import mlflow_client

    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`maven.launch_id` = '{launch_id}'", max_results=1000
    )
    parents = [r for r in runs if r.data.tags.get("maven.run_kind") == PARENT_KIND]
    if not parents:
        return None
    parent = parents[0].info.run_id
    stages = [r for r in runs if r.data.tags.get("maven.run_kind") == STAGE_KIND]

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, key)]

    metrics = summary_metrics(stages, history)
    now = int(time.time() * 1000)
    client.set_tag(parent, "mlflow.runName", name)
    # A param keeps its first value in MLflow: log only the new ones (a rerun changes none).
    logged = parents[0].data.params
    todo = [Param(k, v) for k, v in clip_params(params).items() if k not in logged]
    for start in range(0, len(todo), MAX_PARAMS_PER_CALL):
        client.log_batch(parent, params=todo[start : start + MAX_PARAMS_PER_CALL])
    values = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
    for start in range(0, len(values), MAX_METRICS_PER_CALL):
        client.log_batch(parent, metrics=values[start : start + MAX_METRICS_PER_CALL])
    return parent


def recipe_params(config: Mapping, recipe: str, order: list[str]) -> dict[str, str]:
    """The parent's params: the resolved config (a dict) flattened, less the per-stage keys."""
    from .run_info import flatten_params

    flat = flatten_params({k: v for k, v in config.items() if k not in ("stage", "demo")})
    return flat | {"recipe": recipe, "stages": ",".join(order)}
