"""Seeded sweeps (issue 22, item 6): every arm once per training seed on one demo world, and the report's
mean and standard deviation per arm, the held-out single-image and two-image questions apart."""

from __future__ import annotations

import math

import pytest
import yaml

from maven_dist.config import load_config
from maven_dist.offline.demo import demo_settings
from maven_dist.sweep.report import report_sweep
from maven_dist.sweep.runner import plan_jobs
from maven_dist.sweep.seeds import heldout_key, seed_table, with_image_groups, write_seed_summary
from maven_dist.sweep.spec import SweepError, arm_group, load_sweep
from tests.helpers.mlflow_runs import BASE_PARAMS, LaunchLog, StageLog, log_launch
from tests.helpers.torchrun import REPO


def sweep_file(tmp_path, **extra):
    spec = {"name": "s", "recipe": str(REPO / "tests/recipes/tiny"), "shared": ["stage2", "stage1"]}
    spec |= {"grid": {"model.selector.keep_ratio": [0.1, 1.0]}} | extra
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_arm_runs_once_per_seed_on_the_shared_world(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, seeds=[0, 7]))
    names = [a.name for a in sweep.arms]
    assert names == [
        "keep_ratio=0.1,seed=0",
        "keep_ratio=0.1,seed=7",
        "keep_ratio=1.0,seed=0",
        "keep_ratio=1.0,seed=7",
    ]
    assert sweep.arm("keep_ratio=1.0,seed=7").overrides == ("model.selector.keep_ratio=1.0", "seed=7")
    assert [arm_group(n) for n in names] == ["keep_ratio=0.1"] * 2 + ["keep_ratio=1.0"] * 2
    shared, jobs = plan_jobs(sweep, tmp_path / "out", nproc=1)
    # The training seed is not the world's: every seed trains on the shards the shared stages built.
    assert all(job.demo_assets_from == shared.run_dir for job in jobs)


def test_the_world_has_its_own_seed():
    recipe = "tests/recipes/tiny/stage4.yaml"
    same_world = [demo_settings(load_config(recipe, [f"seed={s}"])) for s in (0, 1)]
    assert same_world[0] == same_world[1]
    assert demo_settings(load_config(recipe, ["demo.seed=1"])) != same_world[0]


@pytest.mark.parametrize(
    "seeds, message",
    [([], "non-empty list"), ("0,1", "non-empty list"), ([0, 0], "twice"), ([0.5], "integers")],
)
def test_bad_seeds_are_refused_naming_the_file(tmp_path, seeds, message):
    path = sweep_file(tmp_path, seeds=seeds)
    with pytest.raises(SweepError, match=message) as error:
        load_sweep(path)
    assert str(path) in str(error.value)


def test_an_arm_that_sets_its_own_seed_is_refused(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], grid={"seed": [3]})
    with pytest.raises(SweepError, match="sets seed= itself"):
        load_sweep(path)


def heldout(values: dict[str, float], gains: dict[str, float]) -> dict[str, float]:
    return {heldout_key(k): v for k, v in values.items()} | {
        heldout_key(k, True): g for k, g in gains.items()
    }


def test_single_image_and_two_image_kinds_are_averaged_apart():
    metrics = with_image_groups(heldout({"colour": 60.0, "shape": 80.0, "compare": 40.0}, {"colour": 30.0}))
    assert metrics[heldout_key("single_image")] == 70.0 and metrics[heldout_key("two_image")] == 40.0
    assert metrics[heldout_key("single_image", True)] == 30.0
    assert heldout_key("two_image", True) not in metrics  # no gain logged for a two-image kind


def test_mean_and_std_over_seeds_per_arm(tmp_path):
    arms = {
        "a,seed=0": heldout({"colour": 60.0, "compare": 40.0}, {"colour": 10.0})
        | {"eval/vqav2/accuracy": 1.0},
        "a,seed=1": heldout({"colour": 80.0, "compare": 50.0}, {"colour": 30.0})
        | {"eval/vqav2/accuracy": 3.0},
        "b,seed=0": heldout({"colour": 20.0, "compare": 30.0}, {"colour": 0.0}),
        "stage_loss": {"stage4/loss/total": 1.0},  # not an eval number: left out
    }
    table = seed_table(arms)
    assert list(table.index.get_level_values("arm").unique()) == ["a", "b"]
    colour = table.loc[("a", heldout_key("colour"))]
    assert (colour["mean"], colour["seeds"]) == (70.0, 2) and colour["std"] == pytest.approx(math.sqrt(200))
    assert table.loc[("a", "eval/vqav2/accuracy"), "mean"] == 2.0
    assert math.isnan(table.loc[("b", heldout_key("colour")), "std"])  # one seed: no spread to report
    csv, md = write_seed_summary(arms, tmp_path / "report")
    assert csv.read_text().startswith("arm,metric,mean,std,seeds")
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in md.read_text().splitlines()
        if line.startswith("| ")
    }
    assert "| 2 | 70.0 ± 14.1 | 20.0 ± 14.1 | 45.0 ± 7.1 | - | 70.0 ± 14.1 |" in rows["a"]
    assert "| 1 | 20.0 | 0.0 | 30.0 | - | 20.0 |" in rows["b"]


def test_a_seeded_sweeps_report_gives_each_arm_its_mean_and_std(tmp_path, monkeypatch):
    """The arms' parent runs as the pipeline leaves them in the sweep's store, then ``maven sweep``'s
    report: seeds.md and seeds.csv beside the per-run report, and in the sweep's MLflow run."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MAVEN_TRACKING_URI", raising=False)
    root = tmp_path / "out"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for arm, colour in (
        ("keep_ratio=0.1,seed=0", 50.0),
        ("keep_ratio=0.1,seed=1", 70.0),
        ("keep_ratio=1.0,seed=0", 40.0),
    ):
        tags = {"maven.sweep": "s", "maven.arm": arm}
        stage4 = StageLog("stage4", {**BASE_PARAMS, "stage.name": "stage4"}, {"loss/total": [(0, 1.0)]})
        log_launch(uri, "s", LaunchLog(arm, [stage4], {heldout_key("colour"): colour}, tags, tags))
    out = report_sweep(load_sweep(sweep_file(tmp_path, seeds=[0, 1])), root)
    md = (out / "seeds.md").read_text()
    assert "| keep_ratio=0.1 | 2 | 60.0 ± 14.1 |" in md and "| keep_ratio=1.0 | 1 | 40.0 |" in md
    client = MlflowClient(uri)
    (sweep_run,) = client.search_runs(
        [client.get_experiment_by_name("s").experiment_id], "tags.`maven.run_kind` = 'sweep'"
    )
    logged = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "report")}
    assert {"report/seeds.md", "report/seeds.csv"} <= logged
