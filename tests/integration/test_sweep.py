"""`maven sweep`: a tiny keep-ratio sweep (α ∈ {0.1, 1.0}) end to end into one store, killed in the
middle of its second arm and rerun: only what was missing runs, into the same MLflow runs; the report
lists every arm with its visual tokens per image and eval scores. Two arms prove all of it; the three-arm sweep
of recipes/ablations/tiny-keep-ratio.yaml is `make sweep-demo` (docs/experiments.md)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from maven_dist.contract.lengths import image_tokens
from maven_dist.sweep.spec import SweepError, load_sweep
from tests.distributed.test_resume import kill_tree
from tests.helpers.torchrun import REPO, cpu_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ALPHAS = (0.1, 1.0)


def sweep_file(tmp_path, tiny_assets):
    """The tiny keep-ratio sweep made cheap: stages 3 and 4 only, stage 3 (from the base models) shared and
    short, the arms' stage 4 short, one benchmark, and the prepared tiny assets linked into every run directory instead of
    being built again."""
    spec = {
        "name": "keep-ratio-test",
        "recipe": str(REPO / "tests" / "recipes" / "tiny"),
        "set": ["demo.enabled=false", "stage.max_steps=8", "checkpoint.every_steps=2", "eval.tasks=[vqav2]",
                "eval.max_new_tokens=4", "stage.init_missing=base"],
        "stages": ["stage3", "stage4"],
        "shared": ["stage3"],
        "grid": {"model.selector.keep_ratio": list(ALPHAS)},
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = tmp_path / "sweep"
    for arm in ["shared", *(f"keep_ratio={a}" for a in ALPHAS)]:
        tiny_assets.link_into(root / arm)
    return path, root


def stage_run_exists(db: Path, arm: str, stage: str) -> bool:
    """Whether the store holds ARM's STAGE run yet (read with sqlite3, so a locked or new store only
    means "not yet")."""
    query = ("SELECT 1 FROM tags AS s JOIN tags AS a ON s.run_uuid = a.run_uuid WHERE s.key = 'maven.stage'"
             " AND s.value = ? AND a.key = 'maven.arm' AND a.value = ?")  # fmt: skip
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute(query, (stage, arm)).fetchone() is not None
    except sqlite3.Error:
        return False


def test_a_killed_sweep_finishes_what_is_missing_into_the_same_runs(tiny_assets, tmp_path):
    path, root = sweep_file(tmp_path, tiny_assets)
    cmd = [sys.executable, "-m", "maven_dist.cli", "sweep", str(path), "--out", str(root)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    latest = root / "keep_ratio=1.0" / "stage4" / "checkpoints" / "latest"
    mid_stage = {f"step_{step:08d}" for step in (2, 4, 6)}
    try:
        deadline = time.monotonic() + 600
        # Mid-arm: the second arm's stage 4 has a checkpoint short of its end, and its run is in the store
        # (the record reaches it by the next sync: on a loaded machine the run can come after the checkpoint).
        while not (latest.is_file() and latest.read_text().strip() in mid_stage
                   and stage_run_exists(root / "mlflow.db", "keep_ratio=1.0", "stage4")):  # fmt: skip
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the second arm never checkpointed"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
    killed_at = latest.read_text().strip()  # the checkpoint the rerun resumes from
    assert killed_at in mid_stage, killed_at
    assert (root / "keep_ratio=0.1" / "arm_finished.json").is_file()
    assert not (root / "keep_ratio=1.0" / "arm_finished.json").is_file()

    rerun = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    out = rerun.stdout + rerun.stderr
    assert "shared: already finished" in out and "keep_ratio=0.1: already finished" in out
    assert "resumed from" in out and killed_at in out

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("keep-ratio-test")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("maven.run_kind") == "launch"]
    assert sorted(r.data.tags["maven.arm"] for r in parents) == sorted(
        ["shared", *(f"keep_ratio={a}" for a in ALPHAS)]
    ), "one launch per arm: the rerun continued the interrupted arm's launch"
    stage4 = [r for r in runs if r.data.tags.get("maven.stage") == "stage4"]
    assert len(stage4) == len(ALPHAS), "the resumed stage reopened its run"
    resumed = [r for r in stage4 if r.data.tags["maven.arm"] == "keep_ratio=1.0"][0]
    assert resumed.data.tags["maven.resume_count"] == "1"
    for arm in parents:
        if arm.data.tags["maven.arm"] != "shared":
            assert arm.info.run_name == f"keep-ratio-test/{arm.data.tags['maven.arm']}"
            assert "eval/vqav2/accuracy" in arm.data.metrics and "stage4/val/loss_best" in arm.data.metrics

    html = (root / "report" / "report.html").read_text()
    for alpha in ALPHAS:
        assert f"keep_ratio={alpha}" in html
        # 112 px / 14 px patches = 64 patches and 32 codes: 38 and 96 visual tokens per image
        tokens = image_tokens(32, 64, alpha, ["discrete", "continuous"])
        assert f">{tokens}<" in html, tokens
    assert "data:image/png;base64," in html
    plots = sorted((root / "report" / "plots").glob("*.png"))
    assert plots and all(Image.open(p).format == "PNG" for p in plots)
    sweep_runs = [r for r in runs if r.data.tags.get("maven.run_kind") == "sweep"]
    (sweep_run,) = sweep_runs or client.search_runs(
        [experiment.experiment_id], filter_string="tags.`maven.run_kind` = 'sweep'"
    )
    logged = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "report")}
    assert "report/report.html" in logged


def test_bad_sweep_files_are_clear_errors(tmp_path):
    recipe = str(REPO / "tests" / "recipes" / "tiny")
    cases = {
        "unknown keys": {"name": "s", "recipe": recipe, "grid": {"seed": [1]}, "typo": 1},
        "not a recipe directory": {"name": "s", "recipe": str(tmp_path), "grid": {"seed": [1]}},
        "needs a non-empty list": {"name": "s", "recipe": recipe, "grid": {"seed": []}},
        "not stages of a recipe": {
            "name": "s",
            "recipe": recipe,
            "shared": ["stage9"],
            "grid": {"seed": [1]},
        },
        "are not in stages": {
            "name": "s",
            "recipe": recipe,
            "stages": ["stage4"],
            "shared": ["stage3"],
            "grid": {"seed": [1]},
        },
        "no arms": {"name": "s", "recipe": recipe},
        "must be unique": {"name": "s", "recipe": recipe, "grid": {"seed": [1]}, "arms": {"seed=1": {}}},
    }
    for message, spec in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(SweepError, match=message):
            load_sweep(path)
    cli = subprocess.run([sys.executable, "-m", "maven_dist.sweep", str(path)], cwd=REPO, env=cpu_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 2 and "must be unique" in cli.stderr and "Traceback" not in cli.stderr
