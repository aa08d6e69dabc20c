"""`maven compare` over two real SQLite stores (two run directories): one row per arm, and its files.

The launches are written with the real MLflow client (tests/helpers/mlflow_runs.py) the way the tracker
writes them; every expected number below is worked out by hand from what was logged.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest

from maven_dist.cli.compare import main
from maven_dist.sweep.report import log_report
from maven_dist.train.tracking.report import (
    HISTORY_KEYS,
    RunSummary,
    build_report,
    find_runs_in_stores,
    group_arms,
    load_histories,
    visual_tokens,
    write_report,
)
from tests.helpers.mlflow_runs import BASE_PARAMS, LaunchLog, StageLog, log_launch

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database, built once: creating one costs ~2 s of migrations."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def launch(launch_id: str, keep_ratio: str, warmup: str, template: str, val4, evals, **tags) -> LaunchLog:
    """Two stages; ``stage.optimizer.lr`` changes from stage to stage (the same in every arm), the
    selector's keep ratio is one value per arm, the warm-up differs between arms in stage 4 only."""
    common = {
        **BASE_PARAMS,
        "model.selector.keep_ratio": keep_ratio,
        "data.template": template,
        "run_dir": f"/runs/{launch_id}",
    }
    stage3 = StageLog(
        "stage3",
        {
            **common,
            "stage.name": "stage3",
            "stage.optimizer.lr": "0.002",
            "stage.schedule.warmup_ratio": "0.0",
        },
        {"loss/total": [(0, 3.0), (1, 2.5), (2, 2.0)], "val/loss": [(2, 2.2)]},
    )
    stage4 = StageLog(
        "stage4",
        {
            **common,
            "stage.name": "stage4",
            "stage.optimizer.lr": "0.001",
            "stage.schedule.warmup_ratio": warmup,
        },
        {
            "loss/total": [(0, 2.0), (2, 1.5), (4, 1.2), (6, 1.1)],
            "val/loss": val4,
            "perf/tokens_per_s": [(1, 100.0), (3, 200.0), (5, 300.0), (6, 1000.0)],
        },
    )
    return LaunchLog(launch_id, [stage3, stage4], evals=evals, **tags)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, empty_store) -> tuple[Path, Path]:
    """Run directory a: the sweep arm alpha-0.1 (tagged on its parent run only) and an unrelated launch;
    run directory b: the sweep arm alpha-0.25 (tagged on parent and stage runs), whose stage 4 was
    resumed and logged val/loss at step 4 twice."""
    root = tmp_path_factory.mktemp("runs")
    dirs = root / "a", root / "b"
    for d in dirs:
        d.mkdir()
        shutil.copyfile(empty_store, d / "mlflow.db")
    uri_a, uri_b = (f"sqlite:///{d / 'mlflow.db'}" for d in dirs)
    sweep = {"maven.sweep": "ratio"}
    log_launch(
        uri_a,
        "maven-test",
        launch(
            "launch-a",
            "0.1",
            "0.1",
            "vicuna_v1",
            [(2, 0.9), (4, 0.7), (6, 0.75)],
            {"eval/synth_vqa/accuracy": 0.5},
            sweep_tags={**sweep, "maven.arm": "alpha-0.1"},
        ),
    )
    log_launch(uri_a, "maven-test", launch("unrelated", "0.5", "0.1", "vicuna_v1", [(2, 1.0)], {}))
    log_launch(
        uri_b,
        "maven-test",
        launch(
            "launch-b",
            "0.25",
            "0.2",
            SCRIPT,
            [(2, 0.8), (4, 0.5), (4, 0.65)],
            {"eval/synth_vqa/accuracy": 0.75, "eval/synth_mme/total": 120.0},
            sweep_tags={**sweep, "maven.arm": "alpha-0.25"},
            stage_tags={**sweep, "maven.arm": "alpha-0.25"},
        ),
    )
    return dirs


def sweep_report(stores):
    runs = find_runs_in_stores([f"sqlite:///{d / 'mlflow.db'}" for d in stores], sweep="ratio")
    load_histories(runs, HISTORY_KEYS)
    return group_arms(runs)


def rows_by_arm(table) -> dict[str, dict[str, object]]:
    return {row["arm"]: row for row in table.to_dict("records")}


def test_one_row_per_arm_with_the_params_that_differ_and_hand_computed_numbers(stores):
    arms = sweep_report(stores)
    assert [a.label for a in arms] == ["alpha-0.1", "alpha-0.25"]  # the unrelated launch is not in the sweep
    report = build_report(arms)
    header = list(report.main.columns)
    # keep_ratio: one value per arm over both stages, one column; the warm-up differs between arms in
    # stage 4 only and changes between stages, so a stage-4 column; lr changes between stages the same
    # way in both arms, and run_dir is per launch: neither is an arm difference.
    assert "model.selector.keep_ratio" in header
    assert "stage.schedule.warmup_ratio [stage4]" in header
    assert "data.template" in header
    assert not any(
        h.startswith(("stage.optimizer.lr", "run_dir", "stage.name", "model.vision")) for h in header
    )
    assert "store" in header  # two stores

    rows = rows_by_arm(report.main)
    a, b = rows["alpha-0.1"], rows["alpha-0.25"]
    assert a["store"] == "a" and b["store"] == "b"
    assert a["last stage"] == b["last stage"] == "stage4"
    assert (a["model.selector.keep_ratio"], b["model.selector.keep_ratio"]) == ("0.1", "0.25")
    assert (a["stage.schedule.warmup_ratio [stage4]"], b["stage.schedule.warmup_ratio [stage4]"]) == (
        "0.1",
        "0.2",
    )
    assert (a["val/loss final"], a["val/loss best"]) == (0.75, 0.7)
    assert (b["val/loss final"], b["val/loss best"]) == (0.65, 0.65)  # the resumed step-4 value wins
    assert a["eval/synth_vqa/accuracy"] == 0.5 and b["eval/synth_vqa/accuracy"] == 0.75
    assert a["eval/synth_mme/total"] is None and b["eval/synth_mme/total"] == 120.0
    # The paper's count: 32 codes + floor(alpha * 576) kept patches (the sequence adds <img></img>).
    assert a["visual tokens/image"] == 32 + 57
    assert b["visual tokens/image"] == 32 + 144
    assert a["tokens/s"] == b["tokens/s"] == 250.0  # median of 100, 200, 300, 1000

    per_stage = rows_by_arm(report.per_stage)
    assert per_stage["alpha-0.1"]["stage3 val/loss final"] == 2.2
    assert per_stage["alpha-0.25"]["stage4 val/loss best"] == 0.65


def test_the_cli_merges_both_run_dirs_and_writes_markdown_csv_html_and_plots(stores, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = (str(d) for d in stores)
    argv = ["--run-dir", a, "--run-dir", b, "--sweep", "ratio", "--markdown", str(out / "report.md")]
    argv += [
        "--csv",
        str(out / "report.csv"),
        "--html",
        str(out / "report.html"),
        "--plots",
        str(out / "plots"),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "alpha-0.1" in text and "alpha-0.25" in text and "unrelated" not in text

    table = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["arm"] for r in table] == ["alpha-0.1", "alpha-0.25"]
    assert table[0]["val/loss best"] == "0.7" and table[1]["data.template"] == SCRIPT
    assert table[0]["stage3 val/loss final"] == "2.2"

    page = (out / "report.html").read_text()
    assert "alpha-0.1" in page and "alpha-0.25" in page
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/png;base64,") == 4  # loss/total and val/loss of stage3 and stage4

    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == [
        "stage3_loss_total.png",
        "stage3_val_loss.png",
        "stage4_loss_total.png",
        "stage4_val_loss.png",
    ]
    from PIL import Image

    for name in pngs:
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()
    md = (out / "report.md").read_text()
    assert "| alpha-0.25 |" in md and "(plots/stage4_val_loss.png)" in md
    assert SCRIPT not in md  # Markdown renders inline HTML too

    # Without --sweep every launch of both stores is an arm.
    assert main(["--run-dir", a, "--run-dir", b]) == 0
    assert "unrelated" in capsys.readouterr().out


def test_log_report_attaches_the_files_to_a_run(stores, tmp_path):
    from mlflow import MlflowClient

    arms = sweep_report(stores)
    paths = write_report(arms, tmp_path / "report")
    uri = f"sqlite:///{stores[0] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("maven-test").experiment_id],
        filter_string="tags.`maven.launch_id` = 'launch-a' AND tags.`maven.run_kind` = 'launch'",
    )[0]
    log_report(uri, parent.info.run_id, paths)
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/report.html", "report/report.md", "report/report.csv", "report/plots"}
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "report/plots")}
    assert "report/plots/stage4_val_loss.png" in plots and len(plots) == 4


def test_arm_labels_take_the_store_where_two_arms_read_the_same():
    def run(store: str, launch: str, **tags) -> RunSummary:
        tags = {"maven.launch_id": launch, **tags}
        return RunSummary("id-" + store, "stage4", "e", "FINISHED", store=store, launch_id=launch, tags=tags)

    arms = group_arms(
        [
            run("sqlite:////runs/x/mlflow.db", "l1", **{"maven.arm": "base"}),
            run("http://user:secret@mlflow:5000", "l2", **{"maven.arm": "base"}),
            run("http://mlflow:5000", "l3"),
        ]
    )
    assert [a.label for a in arms] == ["base @ x", "base @ mlflow:5000", "l3"]


def test_visual_tokens_follow_the_views_of_the_stage():
    params = {**BASE_PARAMS, "model.selector.keep_ratio": "1.0"}
    assert visual_tokens(params) == 32 + 576
    assert visual_tokens({**params, "stage.views": '["discrete"]'}) == 32
    assert (
        visual_tokens({**params, "model.selector.keep_ratio": "0.25", "stage.views": '["continuous"]'}) == 144
    )
    assert visual_tokens({"model.selector.keep_ratio": "0.25"}) is None
