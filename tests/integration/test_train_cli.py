"""`python -m maven_dist.train RECIPE`: the single-stage entry point as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from maven_dist.train.metrics_file import read_metrics
from tests.distributed.test_resume import kill_after_checkpoint
from tests.helpers.torchrun import REPO, cpu_env, run_train, train_command

pytestmark = pytest.mark.timeout(900)


def test_tiny_stage4_runs_from_scratch_and_its_loss_falls(tmp_path):
    """Nothing prepared beforehand: training says how to build the demo assets; `maven prepare-demo` does,
    then the stage trains."""
    refused = run_train(1, "tests/recipes/tiny/stage4.yaml", [f"run_dir={tmp_path}"], check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "maven prepare-demo" in refused.stderr and "Traceback" not in refused.stderr
    prepare = [sys.executable, "-m", "maven_dist.cli", "prepare-demo", "tests/recipes/tiny/stage4.yaml"]
    subprocess.run(
        [*prepare, "--set", f"run_dir={tmp_path}"], cwd=REPO, env=cpu_env(), check=True, timeout=600
    )
    result = run_train(1, "tests/recipes/tiny/stage4.yaml", [f"run_dir={tmp_path}"])
    assert "starting from the base models" in result.stdout + result.stderr  # init_missing=base, said aloud
    rows = read_metrics(tmp_path / "stage4" / "metrics.jsonl")
    losses = [r["loss/total"] for r in rows]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    for key in (
        "loss/lm",
        "optim/grad_norm",
        "perf/tokens_per_s",
        "perf/samples_per_s",
        "perf/model_tflops",
        "memory/peak_rss_gb",
        "model/visual_tokens_per_image",
        "data/skipped_samples",
        "optim/lr/llm/decay",
    ):
        assert key in rows[-1], key
    assert rows[-1]["model/visual_tokens_per_image"] == 32 + 16  # 32 codes + floor(0.25 * 64) patches
    assert (tmp_path / "stage4" / "export" / "config.json").is_file()
    assert (tmp_path / "mlflow.db").is_file()


def test_a_stage_sigkilled_mid_run_then_maven_sync_gives_mlflow_every_metric_of_metrics_jsonl(
    tiny_assets, tmp_path
):
    """Rank 0 writes metrics.jsonl before MLflow hears of it. The stage syncs only when it starts here (a
    long tracking.flush_interval_s), so when it is SIGKILLed the store lacks nearly everything; `maven sync`
    afterwards sends it all, and a second run of it sends nothing twice. Stage 1 logs the selector's quality."""
    from mlflow import MlflowClient

    from maven_dist.cli import main as maven

    overrides = tiny_assets.overrides(tmp_path) + [
        "checkpoint.every_steps=5",
        "tracking.flush_interval_s=3600",
    ]
    command = train_command(1, "tests/recipes/tiny/stage1.yaml", overrides)
    kill_after_checkpoint(command, tmp_path / "stage1" / "checkpoints" / "latest", "step_00000005")
    local = read_metrics(tmp_path / "stage1" / "metrics.jsonl")
    assert len(local) >= 5
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("maven-tiny").experiment_id],
                                "tags.`maven.stage` = 'stage1'")  # fmt: skip
    assert run.info.status == "RUNNING" and not run.data.metrics, "made at the start, then killed"

    assert maven(["sync", str(tmp_path)]) == 0
    assert maven(["sync", str(tmp_path)]) == 0
    keys = {k for row in local for k in row} - {"step", "time_ms"}
    assert {"loss/selector_bce", "selector/precision", "selector/recall", "selector/f1"} <= keys
    assert "system/cpu_percent" in keys
    for key in keys:
        stored = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert stored == [(row["step"], row[key]) for row in local if key in row], key


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_assets, tmp_path):
    """An absurd learning rate blows the projector up: the NaN steps are skipped and counted, and
    `stage.max_bad_steps` in a row stop the run with a diagnostic naming the samples."""
    overrides = tiny_assets.overrides(tmp_path) + [
        "stage.optimizer.lr=1e30",
        "stage.optimizer.grad_clip=0",
        "stage.schedule.warmup_ratio=0",
        "stage.max_bad_steps=3",
        "tracking.enabled=false",
    ]
    result = run_train(1, "tests/recipes/tiny/stage3.yaml", overrides, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "3 consecutive non-finite losses" in output and "last samples" in output
    assert output.count("non-finite loss at step") == 3


def test_bad_override_is_a_clear_error_not_a_traceback(tmp_path):
    result = run_train(
        1, "tests/recipes/tiny/stage4.yaml", [f"run_dir={tmp_path}", "stage.max_stepz=3"], check=False
    )
    assert result.returncode == 2
    assert "unknown key 'stage.max_stepz'" in result.stderr and "Traceback" not in result.stderr
