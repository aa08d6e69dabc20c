"""The evaluation runner and `maven eval`: scores through the real scorers, resume, one rank = two ranks,
results in MLflow under the launch's parent run, bad benchmarks refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maven_dist.eval.runner import run_task
from maven_dist.eval.tasks.base import Prediction
from maven_dist.eval.tasks.registry import load_task
from maven_dist.offline.synthetic import generate_synthetic
from maven_dist.offline.synthetic_benchmarks import write_synthetic_benchmarks
from tests.helpers.predictors import ConstantPredictor, OraclePredictor
from tests.helpers.torchrun import REPO, cpu_env, torchrun
from tests.unit.test_inference import export_like

MAIN_METRIC = {
    "vqav2": ("accuracy", 100.0),
    "gqa": ("accuracy", 100.0),
    "textvqa": ("accuracy", 100.0),
    "mmbench": ("circular_gen", 100.0),
    "seedbench": ("accuracy_gen", 100.0),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("bench")
    names = write_synthetic_benchmarks(
        root, generate_synthetic(root / "images", 12, seed=5, image_size=64), seed=5
    )
    return root, names


def test_an_oracle_scores_the_maximum_and_a_constant_what_the_answers_imply(bench, tmp_path):
    root, names = bench
    for name in names:
        task = load_task(name, root, tmp_path / "cache")
        oracle = run_task(task, OraclePredictor(), tmp_path / "oracle").metrics
        if name in MAIN_METRIC:
            metric, best = MAIN_METRIC[name]
            assert oracle[metric] == pytest.approx(best), (name, oracle)
        elif name == "mme":
            assert oracle["total"] == pytest.approx(
                200.0 * len([k for k in oracle if k not in ("perception", "cognition", "total")])
            )
        else:
            assert all(v == pytest.approx(100.0) for v in oracle.values()), (name, oracle)
        # A constant answer through the runner scores what the task's scorer gives those predictions.
        constant = run_task(task, ConstantPredictor("yes"), tmp_path / "constant").metrics
        predictions = {}
        for row in map(
            json.loads, (tmp_path / "constant" / name / "predictions.jsonl").read_text().splitlines()
        ):
            assert row["prediction"] in ("yes", "A"), row
            predictions[row["id"]] = row
        assert len(predictions) == len(task.questions())
        rebuilt = {i: Prediction(i, r["prediction"], tuple(r["scores"])) for i, r in predictions.items()}
        assert constant == task.score(rebuilt)


class Crashing(OraclePredictor):
    """Fails after `ok` batches: what a preempted or crashed evaluation leaves behind."""

    def __init__(self, ok: int):
        self.ok, self.calls, self.asked = ok, 0, []

    def generate(self, questions):
        self.calls += 1
        if self.calls > self.ok:
            raise RuntimeError("preempted")
        self.asked += [q.id for q in questions]
        return super().generate(questions)


def test_a_rerun_finishes_only_what_is_missing(bench, tmp_path):
    root, _ = bench
    task = load_task("vqav2", root, tmp_path / "cache")
    with pytest.raises(RuntimeError, match="preempted"):
        run_task(task, Crashing(ok=1), tmp_path / "out", batch_size=4)
    first = Crashing(ok=10**6)
    resumed = run_task(task, first, tmp_path / "out", batch_size=4)
    assert len(first.asked) == len(task.questions()) - 4, (
        "questions predicted before the crash were asked again"
    )
    whole = run_task(task, OraclePredictor(), tmp_path / "whole", batch_size=4)
    assert resumed.metrics == whole.metrics
    assert (tmp_path / "out" / "vqav2" / "predictions.jsonl").read_text() == (
        tmp_path / "whole" / "vqav2" / "predictions.jsonl"
    ).read_text()


def test_a_slow_rank_still_splits_the_questions_as_the_fast_one_did(bench, tmp_path):
    """Two ranks as threads, rank 1 slow out of the first barrier (a loaded machine): rank 0 writes its first
    predictions before rank 1 has read what is done, and every question must still be predicted once."""
    root, _ = bench
    task = load_task("vqav2", root, tmp_path / "cache")
    sync = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def rank(r: int) -> None:
        calls = [0]

        def barrier() -> None:
            sync.wait()
            calls[0] += 1
            if r == 1 and calls[0] == 1:
                time.sleep(1.0)

        try:
            results[r] = run_task(
                task, OraclePredictor(), tmp_path / "out", r, 2, batch_size=2, barrier=barrier
            )
        except Exception as e:  # noqa: BLE001 - reported below, with the rank
            errors.append((r, e))
            sync.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    whole = run_task(task, OraclePredictor(), tmp_path / "whole", batch_size=2)
    assert results[0].metrics == whole.metrics and results[1] is None


@pytest.fixture(scope="module")
def model_dir(tiny_assets, tmp_path_factory):
    return export_like(tiny_assets, tmp_path_factory.mktemp("eval_model") / "export")[1]


def _without_paths(predictions: Path) -> list[dict]:
    """The records without their image paths (MMBench's images are decoded under each OUT's cache)."""
    return [{k: v for k, v in json.loads(line).items() if k != "images"} for line in predictions.open()]


@pytest.mark.distributed
def test_two_ranks_give_the_one_rank_predictions_and_mlflow_holds_the_scores(model_dir, tmp_path):
    tasks = ["--tasks", "vqav2,mme,mmbench", "--max-new-tokens", "6", "--batch-size", "4"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "launch_id").write_text("launch-eval-test")
    # The cluster's store, as slurm/env.sh exports it: --run-dir's stages would have logged there too.
    store = f"sqlite:///{tmp_path / 'cluster.db'}"
    one = subprocess.run(
        [sys.executable, "-m", "maven_dist.eval", str(model_dir), "--out", str(tmp_path / "one"), *tasks,
         "--run-dir", str(run_dir), "--experiment", "maven-eval-test"],
        cwd=REPO, env=cpu_env() | {"MAVEN_TRACKING_URI": store}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # the same benchmark files (the one-rank run wrote the synthetic set)
    data = ["--data", str(tmp_path / "one" / "synthetic_benchmarks")]
    torchrun(
        2,
        [
            "-m",
            "maven_dist.eval",
            str(model_dir),
            "--out",
            str(tmp_path / "two"),
            *tasks,
            *data,
            "--no-tracking",
        ],
    )
    for task in ("vqav2", "mme", "mmbench"):
        a, b = (_without_paths(tmp_path / d / task / "predictions.jsonl") for d in ("one", "two"))
        assert a == b, f"{task}: two ranks predicted differently"
        assert json.loads((tmp_path / "one" / task / "metrics.json").read_text()) == json.loads(
            (tmp_path / "two" / task / "metrics.json").read_text()
        )
    assert "| vqav2 | accuracy |" in one.stdout

    from mlflow import MlflowClient

    assert not (run_dir / "mlflow.db").exists()
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("maven-eval-test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("maven.run_kind") == "launch"]
    (evaluation,) = [r for r in runs if r.data.tags.get("maven.stage") == f"eval-{model_dir.parent.name}"]
    assert evaluation.data.tags["mlflow.parentRunId"] == parent.info.run_id
    scores = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert evaluation.data.metrics["eval/vqav2/accuracy"] == pytest.approx(scores["vqav2"]["accuracy"])
    assert evaluation.data.metrics["eval/mme/total"] == pytest.approx(scores["mme"]["total"])
    tags = evaluation.data.tags
    assert (
        tags["maven.eval.model_dir"] == str(model_dir.resolve())
        and len(tags["maven.eval.data_version"]) == 16
    )
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval/mme")}
    assert "eval/mme/predictions.jsonl" in artifacts


def test_a_benchmark_with_a_missing_image_is_refused_with_its_record(model_dir, bench, tmp_path):
    import shutil

    root = tmp_path / "bench"
    shutil.copytree(bench[0] / "vqav2", root / "vqav2")
    first = json.loads((root / "vqav2" / "questions.jsonl").read_text().splitlines()[0])
    (root / "vqav2" / "images" / first["image"]).unlink()
    out = subprocess.run(
        [sys.executable, "-m", "maven_dist.eval", str(model_dir), "--data", str(root), "--out", str(tmp_path / "o"),
         "--no-tracking"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and str(first["question_id"]) in out.stderr
