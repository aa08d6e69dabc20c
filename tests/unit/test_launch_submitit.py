"""The submitit callable and `python -m maven_dist.launch`: checkpoint(), in-process entry, CLI errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from maven_dist.launch.__main__ import MIN_TIMEOUT_MIN, build_executor, build_parser
from maven_dist.launch.checks import Layout
from maven_dist.launch.stage_job import StageJob, run_entry

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests/recipes/tiny/stage4.yaml")


def test_checkpoint_resubmits_the_same_stage_one_attempt_later() -> None:
    job = StageJob(TINY, ["run_dir=/tmp/r"])
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, StageJob) and again is not job
    assert (again.recipe, again.overrides, again.entry, again.attempt) == (
        TINY,
        ["run_dir=/tmp/r"],
        "maven_dist.train",
        1,
    )
    assert again.checkpoint().function.attempt == 2
    assert pickle.loads(pickle.dumps(delayed)).function == again  # submitit pickles it for the requeue


def test_run_entry_returns_the_exit_code_and_restores_argv(tmp_path: Path) -> None:
    script = tmp_path / "entry.py"
    script.write_text("import sys\nprint(sys.argv)\nsys.exit(int(sys.argv[1]))\n")
    argv = list(sys.argv)
    assert run_entry(str(script), ["75"]) == 75
    assert run_entry(str(script), ["0"]) == 0
    assert sys.argv == argv
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert run_entry(str(tmp_path / "plain.py"), []) == 0


def test_build_executor_for_slurm_and_local(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [TINY, "--partition", "debug", "--account", "proj", "--timeout-min", "5"]
    )
    ex = build_executor(args, Layout(2, 4, 4), tmp_path, "maven-stage4")
    assert ex.cluster == "slurm"
    params = ex._executor.parameters
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["partition"] == "debug" and params["additional_parameters"] == {
        "requeue": True,
        "account": "proj",
    }
    assert params["time"] == MIN_TIMEOUT_MIN  # > 10 min: submitit counts USR2 as preemption, not time-out
    assert params["signal_delay_s"] == 120
    local = build_executor(build_parser().parse_args([TINY, "--local"]), Layout(1, 2, 0), tmp_path, "x")
    assert local.cluster == "local"


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maven_dist.launch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recipes/tiny/missing.yaml", "--local"], "recipe recipes/tiny/missing.yaml does not exist"),
        ([TINY, "--local", "--nodes", "2"], "--local runs on this machine only: --nodes 2 must be 1"),
        (
            [TINY, "--local", "--tasks-per-node", "3"],
            "is not a multiple of stage.micro_batch_size * dp = 4 * 3 = 12",
        ),
        (
            [
                TINY,
                "--local",
                "--tasks-per-node",
                "3",
                "--set",
                "parallel.backend=3d",
                "--set",
                "parallel.tp=2",
            ],
            "world size 3 (1 node(s) x 3 task(s)) is not a multiple of parallel.tp * parallel.pp = 2 * 1 = 2",
        ),
        (["recipes/maven-7b/stage4.yaml", "--local"], "which needs GPUs, but this launch asks for none"),
    ],
)
def test_cli_refuses_before_submitting(args: list[str], message: str, tmp_path: Path) -> None:
    out = _launch(*args, "--folder", str(tmp_path / "submitit"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert not (tmp_path / "submitit").exists()  # nothing was submitted


def test_cli_local_gpus_are_counted_here(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = _launch(TINY, "--local", "--gpus-per-node", "1", "--folder", str(tmp_path))
    assert out.returncode == 2
    assert "1 GPU(s) per node requested but no CUDA device is visible" in out.stderr
