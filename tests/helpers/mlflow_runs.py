"""Launches written straight into a real MLflow store with the tags, params and metric histories the tracker
writes (a parent run per launch, nested stage runs, an ``eval-*`` run), for the comparison tests."""

from __future__ import annotations

from dataclasses import dataclass, field

# Params of the recorded config the report reads; 336 px CLIP-L/14 (576 patches) and 32 codes.
BASE_PARAMS = {
    "model.vision.image_size": "336",
    "model.vision.patch_size": "14",
    "model.discrete.num_codes": "32",
    "stage.views": '["discrete", "continuous"]',
}


@dataclass
class StageLog:
    name: str
    params: dict[str, str]
    metrics: dict[str, list[tuple[int, float]]]
    """``key -> [(step, value), ...]`` in logging order (a step may repeat, as after a resume)."""


@dataclass
class LaunchLog:
    launch_id: str
    stages: list[StageLog]
    evals: dict[str, float] = field(default_factory=dict)
    """Metrics of the launch's ``eval-stage4`` run; none: no evaluation run."""
    sweep_tags: dict[str, str] = field(default_factory=dict)
    """``maven.sweep`` / ``maven.arm``, set on the parent run."""
    stage_tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on every stage run (a sweep tags those too)."""


def log_launch(uri: str, experiment: str, launch: LaunchLog) -> str:
    """Write ``launch`` into the store at ``uri``; returns the parent run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    parent = client.create_run(
        exp_id,
        tags={"maven.launch_id": launch.launch_id, "maven.run_kind": "launch", **launch.sweep_tags},
        run_name=launch.launch_id,
    )
    stages = list(launch.stages)
    if launch.evals:
        stages.append(
            StageLog("eval-stage4", {"eval.tasks": "synth"}, {k: [(0, v)] for k, v in launch.evals.items()})
        )
    clock = 1_700_000_000_000
    for stage in stages:
        clock += 60_000
        run = client.create_run(
            exp_id,
            start_time=clock,
            tags={
                "maven.launch_id": launch.launch_id,
                "maven.stage": stage.name,
                "maven.run_kind": "stage",
                "mlflow.parentRunId": parent.info.run_id,
                **launch.stage_tags,
            },
            run_name=stage.name,
        )
        metrics = []
        for key, points in stage.metrics.items():
            for i, (step, value) in enumerate(points):
                metrics.append(Metric(key, value, clock + i, step))
        params = [Param(k, v) for k, v in stage.params.items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id
