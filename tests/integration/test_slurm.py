"""The Slurm path on a real single-node Slurm (slurm/local/start.sh): sbatch scripts, requeue on
preemption, the submitit launcher (Slurm and --local), the chained recipe, clear errors.

A session fixture starts Slurm with the project's script and stops it at the end (only if it was
not already running). The stage tests run the real trainer on recipes/tiny; the plumbing tests of
the launcher itself run this file as a stand-in task (see ``standin_main`` at the bottom), which
reports its torch.distributed variables and handles USR2 through maven_dist.contract.preemption.

Run alone: ``.venv/bin/pytest tests/integration/test_slurm.py -m integration`` (as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TINY = "tests/recipes/tiny"
# Short stages (the checkpoint at step 4 is where the preemption tests interrupt), val/loss only at the end.
STAGE_SETS = [
    "--set",
    "stage.max_steps=12",
    "--set",
    "checkpoint.every_steps=4",
    "--set",
    "stage.eval_every=0",
]
FINAL_STEP = 12
JOB_TIMEOUT_S = 600

# tests/run_all.sh hands pytest-xdist whole files (--dist loadfile): one worker runs all of these, so one
# session starts the single-node cluster, and stops it only after the last of them.
pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------ helpers


def _scontrol_ping() -> bool:
    if shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "is UP" in out.stdout


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A running single-node Slurm, started with slurm/local/start.sh (installs it if needed)."""
    if os.geteuid() != 0:
        pytest.skip("starting the single-node Slurm needs root (slurm/local/start.sh)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    was_up = _scontrol_ping()
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", str(REPO / "slurm/local/start.sh")], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"slurm/local/start.sh failed:\n{out.stderr[-3000:]}"
    print(f"Slurm up in {time.monotonic() - t0:.1f} s (already running: {was_up})")
    yield
    if not was_up:
        subprocess.run(
            ["bash", str(REPO / "slurm/local/stop.sh")], capture_output=True, text=True, timeout=120
        )


def job_env(**extra: str) -> dict[str, str]:
    """The environment of `source slurm/env.local.sh` (CPU node, partition debug)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MAVEN_"))}
    env.update(
        MAVEN_SLURM_ENV=str(REPO / "slurm/env.local.sh"),
        MAVEN_PYTHON=PYTHON,
        SBATCH_PARTITION=os.environ.get("MAVEN_SLURM_PARTITION", "debug"),
        SBATCH_TIMELIMIT="00:30:00",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def sbatch(
    cwd: Path, script: str, *args: str, sbatch_opts: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> str:
    # two CPU tasks on the node: what slurm/env.local.sh would ask for
    cmd = [
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        *sbatch_opts,
        str(REPO / script),
        *args,
    ]
    out = subprocess.run(cmd, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_state(
    job_id: str, states: tuple[str, ...], timeout: float = JOB_TIMEOUT_S, log: Path | None = None
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(
        f"job {job_id} not in {states} after {timeout} s: {info.get('JobState')} {info.get('Reason')}\n{tail}"
    )


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stage_log(cwd: Path, stage: str, job_id: str) -> Path:
    return cwd / f"maven-{stage}-{job_id}.out"


def latest_step(run_dir: Path, stage: str) -> int:
    latest = run_dir / stage / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    return int(re.sub(r"\D", "", latest.read_text()) or 0)


def export_tensors(run_dir: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    export = run_dir / stage / "export"
    files = sorted(export.rglob("*.safetensors"))
    assert files, f"no exported weights under {export}"
    out = {}
    for f in files:
        for k, v in load_file(f).items():
            out[f"{f.relative_to(export)}/{k}"] = v
    return out


def assert_same_weights(a: Path, b: Path, stage: str = "stage4") -> None:
    import torch

    ta, tb = export_tensors(a, stage), export_tensors(b, stage)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def mlflow_stage_runs(run_dir: Path, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    db = run_dir / "mlflow.db"
    assert db.exists(), f"no MLflow store at {db}"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments) if r.data.tags.get("maven.stage") == stage]


# ------------------------------------------------------------------------------------------ plumbing


def test_plumbing_ranks_rendezvous_and_usr2_requeue(slurm: None, tiny_assets, tmp_path: Path) -> None:
    """slurm/launch.sh with a stand-in task: 2 ranks, their env, USR2 -> save -> requeue -> resume."""
    from maven_dist.launch.slurm_env import port_for_job

    run = tiny_assets.link_into(tmp_path / "run")  # the launcher's demo step finds them built
    env = job_env(MAVEN_TRAIN_CMD=f"{PYTHON} {__file__}", STANDIN_STEPS="20")
    jid = sbatch(tmp_path, "slurm/stage4.sh", f"{TINY}/stage4.yaml", "--set", f"run_dir={run}", env=env)
    log = stage_log(tmp_path, "stage4", jid)
    wait_until(lambda: len(list(run.glob("env*.0.json"))) == 2, 120, "both stand-in ranks to start")
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], check=True)
    wait_state(jid, ("COMPLETED",), 180, log)
    text = log.read_text()
    assert "USR2: asking the trainer to save and stop" in text
    assert f"scontrol requeue {jid}" in text and "restart 1" in text
    for rank in (0, 1):
        first = json.loads((run / f"env{rank}.0.json").read_text())
        again = json.loads((run / f"env{rank}.1.json").read_text())
        assert first["RANK"] == str(rank) and first["LOCAL_RANK"] == str(rank)
        assert first["WORLD_SIZE"] == first["LOCAL_WORLD_SIZE"] == "2"
        assert first["MASTER_ADDR"] == "localhost" and first["MASTER_PORT"] == str(port_for_job(jid))
        assert first["MAVEN_LAUNCHER"] == "sbatch" and again["MAVEN_REQUEUE_COUNT"] == "1"
        saved = int((run / f"saved{rank}").read_text())
        assert 0 < saved < 20
        assert (run / f"step{rank}").read_text() == "20"  # resumed from `saved`, not from 0
        assert (run / f"resumed{rank}").read_text() == str(saved)


def test_plumbing_a_rank_that_dies_ends_the_job_with_its_error_first(
    slurm: None, tiny_assets, tmp_path: Path
) -> None:
    """srun --kill-on-bad-exit=1: rank 1 raises at step 3 while rank 0 would count for 10 minutes; the job
    fails within seconds, and the first error in the log is rank 1's."""
    run = tiny_assets.link_into(tmp_path / "run")
    env = job_env(MAVEN_TRAIN_CMD=f"{PYTHON} {__file__}", STANDIN_STEPS="1200", STANDIN_DIE_RANK="1")
    jid = sbatch(tmp_path, "slurm/stage4.sh", f"{TINY}/stage4.yaml", "--set", f"run_dir={run}", env=env)
    log = stage_log(tmp_path, "stage4", jid)
    wait_until(lambda: len(list(run.glob("env*.0.json"))) == 2, 120, "both stand-in ranks to start")
    started = time.monotonic()
    info = wait_state(jid, ("FAILED", "COMPLETED", "CANCELLED"), 120, log)
    assert info["JobState"] == "FAILED" and time.monotonic() - started < 60, info
    text = log.read_text()
    errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
    assert errors and errors[0].startswith("1:") and "stand-in rank 1 died at step 3" in text, errors[:5]
    assert "srun: error" in text and "task 1" in text
    # srun's TERM made rank 0 save (a stand-in's save is a file), but no checkpoint was complete: no requeue.
    assert f"scontrol requeue {jid}" not in text and job_info(jid).get("Restarts", "0") == "0"


def test_plumbing_submitit_local_requeue(tmp_path: Path) -> None:
    """StageJob under submitit's local executor: the time-out USR2 -> save -> requeue (exit 144) -> resume."""
    import submitit

    from maven_dist.launch.stage_job import StageJob

    run = tmp_path / "run"
    ex = submitit.LocalExecutor(folder=tmp_path / "submitit" / "%j")
    # A 30 s limit and USR2 12 s before it, at 18 s: the tasks have started and installed their handler
    # by then even on a loaded machine (a USR2 before that would kill them), and the stand-in (80 steps
    # of 0.25 s after its start) is still counting, so it is interrupted once and resumes.
    ex.update_parameters(tasks_per_node=2, timeout_min=0.5, signal_delay_s=12)
    os.environ.update(STANDIN_STEPS="80", STANDIN_STEP_S="0.25")
    try:
        job = ex.submit(StageJob(str(REPO / TINY / "stage4.yaml"), [f"run_dir={run}"], entry=__file__))
        assert job.results() == [0, 0]
    finally:
        del os.environ["STANDIN_STEPS"], os.environ["STANDIN_STEP_S"]
    for rank in (0, 1):
        saved = int((run / f"saved{rank}").read_text())
        assert 0 < saved < 80 and (run / f"resumed{rank}").read_text() == str(saved)
        assert (run / f"step{rank}").read_text() == "80"
        assert json.loads((run / f"env{rank}.0.json").read_text())["MAVEN_LAUNCHER"] == "submitit-local"


# ------------------------------------------------------------------------------------------ clear errors


@pytest.mark.parametrize(
    ("args", "sbatch_opts", "env_file", "message"),
    [
        (["recipes/tiny/nope.yaml"], (), "env.local.sh", "recipe recipes/tiny/nope.yaml does not exist"),
        (
            [f"{TINY}/stage4.yaml", "--set", "parallel.backend=3d", "--set", "parallel.tp=2"],
            ("--ntasks-per-node=1",),
            "env.local.sh",
            "world size 1 (1 node(s) x 1 task(s)) is not a multiple of parallel.tp * parallel.pp = 2 * 1 = 2",
        ),
        (
            [],
            (),
            "env.local.sh",
            "recipes/maven-7b/stage4.yaml trains a ~6.7B-parameter LLM, which needs GPUs",
        ),
        ([f"{TINY}/stage4.yaml"], (), "env.sh", "env.sh asks for 8 GPU(s) per node but this job has none"),
    ],
)
def test_sbatch_clear_errors(
    slurm: None, tmp_path: Path, args: list[str], sbatch_opts: tuple[str, ...], env_file: str, message: str
) -> None:
    env = job_env(MAVEN_SLURM_ENV=str(REPO / "slurm" / env_file))
    jid = sbatch(
        tmp_path,
        "slurm/stage4.sh",
        *args,
        "--set",
        f"run_dir={tmp_path / 'run'}",
        sbatch_opts=sbatch_opts,
        env=env,
    )
    log = stage_log(tmp_path, "stage4", jid)
    info = wait_state(jid, ("FAILED", "COMPLETED"), 120, log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert message in log.read_text()
    assert not (tmp_path / "run" / "stage4" / "checkpoints").exists()


def test_submit_mode_refuses_before_queueing(slurm: None, tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(REPO / "slurm/stage4.sh"), "recipes/tiny/nope.yaml"],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "recipe recipes/tiny/nope.yaml does not exist" in out.stderr
    out = subprocess.run(
        ["bash", str(REPO / "slurm/recipe.sh"), "recipes/nope"],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "recipe directory recipes/nope does not exist" in out.stderr


# ------------------------------------------------------------------------------------------ real stages


def assets_of(reference_run: Path):
    """The base models and shards the reference job built inside its job: the runs compared with it link
    them instead of building the same ones again."""
    from tests.conftest import TinyAssets  # here: the stand-in runs this file as a script

    return TinyAssets(reference_run)


REFERENCE_TIME = "00:42:00"  # the env file's time limit for the README's command (env.local.sh says 00:30:00)


@pytest.fixture(scope="session")
def reference_stage4(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The README's command, `bash slurm/stage4.sh recipes/tiny/stage4.yaml --set run_dir=...`, with an env
    file (env.local.sh, another time limit) and nothing else setting sbatch options; uninterrupted:
    (cwd, run_dir, job id)."""
    cwd = tmp_path_factory.mktemp("reference")
    run = cwd / "run"
    env_file = cwd / "env.sh"
    local = (REPO / "slurm/env.local.sh").read_text()
    assert 'MAVEN_TIME="00:30:00"' in local
    env_file.write_text(local.replace('MAVEN_TIME="00:30:00"', f'MAVEN_TIME="{REFERENCE_TIME}"'))
    env = job_env(MAVEN_SLURM_ENV=str(env_file), MAVEN_LOG_DIR=str(cwd))
    env = {k: v for k, v in env.items() if not k.startswith("SBATCH_")}
    out = subprocess.run(
        ["bash", str(REPO / "slurm/stage4.sh"), f"{TINY}/stage4.yaml", "--set", f"run_dir={run}", *STAGE_SETS],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    jid = out.stdout.split()[-1]
    wait_state(
        jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), JOB_TIMEOUT_S, stage_log(cwd, "stage4", jid)
    )
    return cwd, run, jid


@pytest.mark.slow
def test_sbatch_stage4_runs_two_tasks_and_writes_checkpoints_and_mlflow(
    reference_stage4: tuple[Path, Path, str],
) -> None:
    cwd, run, jid = reference_stage4
    log = stage_log(cwd, "stage4", jid)
    info = job_info(jid)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    # env.local.sh's settings, from the env file alone (issue 17): partition, time, 2 CPU tasks, no GPU.
    assert info["Partition"] == os.environ.get("MAVEN_SLURM_PARTITION", "debug")
    assert info["TimeLimit"] == REFERENCE_TIME
    assert info["NumTasks"] == "2" and "gpu" not in info.get("TresPerNode", "")
    assert "world size 2" in log.read_text()
    assert latest_step(run, "stage4") == FINAL_STEP
    assert (run / "stage4" / "export").is_dir()
    runs = mlflow_stage_runs(run, "stage4")
    assert runs, "no MLflow stage run tagged maven.stage=stage4"
    assert any(r.data.tags.get("slurm.job_id") == jid for r in runs)


@pytest.mark.slow
def test_sbatch_preemption_resumes_to_the_same_weights(
    reference_stage4: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """`scontrol requeue` (what a preemption does): Slurm TERMs the real trainer, which saves; the job
    requeues and resumes to the uninterrupted run's weights. The time-limit path (the batch script's USR2
    trap -> save -> requeue) is proved on slurm/stage4.sh by the plumbing test, and on the real trainer
    receiving USR2 by the submitit test below; a third full training here would prove nothing new."""
    _, reference_run, _ = reference_stage4
    run = assets_of(reference_run).link_into(tmp_path / "run")
    jid = sbatch(tmp_path, "slurm/stage4.sh", f"{TINY}/stage4.yaml", "--set", f"run_dir={run}", *STAGE_SETS)
    log = stage_log(tmp_path, "stage4", jid)
    wait_until(lambda: latest_step(run, "stage4") >= 4, JOB_TIMEOUT_S, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", jid], check=True)
    wait_until(lambda: job_info(jid).get("Restarts", "0") != "0", 120, "the requeue")
    info = wait_state(jid, ("COMPLETED", "FAILED", "CANCELLED"), JOB_TIMEOUT_S, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "restart 1" in text and "resumed from" in text
    # Every rank of the requeued run exited 0 (issue 17: one died of SIGABRT after its export): srun
    # reports each task that exits non-zero or on a signal as "srun: error: NODE: task N: ...".
    requeued = text[text.index("restart 1") :]
    assert "stage4 finished" in requeued and "srun: error" not in requeued, requeued[-4000:]
    assert latest_step(run, "stage4") == FINAL_STEP
    assert_same_weights(reference_run, run)
    (stage_run,) = [r for r in mlflow_stage_runs(run, "stage4") if r.data.tags.get("slurm.job_id") == jid]
    assert stage_run.data.tags.get("slurm.restart_count") == "1"  # the requeue, on the same stage run
    assert stage_run.data.tags.get("maven.resume_count") == "1"


@pytest.mark.slow
def test_submitit_slurm_stage_resumes_after_interrupt(
    reference_stage4: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """`python -m maven_dist.launch` submits to Slurm; job._interrupt() (TERM + USR2) -> requeue -> resume."""
    import submitit

    _, reference_run, _ = reference_stage4
    run = assets_of(reference_run).link_into(tmp_path / "run")
    folder = tmp_path / "submitit"
    out = subprocess.run(
        [PYTHON, "-m", "maven_dist.launch", f"{TINY}/stage4.yaml", "--tasks-per-node", "2", "--partition", "debug",
         "--folder", str(folder), "--set", f"run_dir={run}", *STAGE_SETS],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    match = re.search(r"submitted stage4 to Slurm: job (\d+), folder (\S+)", out.stdout)
    assert match and match.group(2) == str(folder), out.stdout
    job = submitit.SlurmJob(folder=folder / "%j", job_id=match.group(1), tasks=(0, 1))
    wait_until(lambda: latest_step(run, "stage4") >= 4, JOB_TIMEOUT_S, "the first checkpoint")
    job._interrupt()
    # Without accounting, submitit cannot tell a dead job from a slow one: wait for the result
    # files ourselves, bounded, before asking for them.
    results = lambda: list((tmp_path / "submitit" / job.job_id).glob(f"{job.job_id}_*_result.pkl"))  # noqa: E731
    wait_until(lambda: len(results()) == 2, JOB_TIMEOUT_S, f"job {job.job_id}'s results")
    assert job.results() == [0, 0]
    assert job_info(job.job_id).get("Restarts") == "1"
    assert latest_step(run, "stage4") == FINAL_STEP
    assert_same_weights(reference_run, run)
    runs = mlflow_stage_runs(run, "stage4")
    assert [
        r.data.tags.get("slurm.restart_count") for r in runs if r.data.tags.get("slurm.job_id") == job.job_id
    ] == ["1"]


@pytest.mark.slow
def test_launch_cli_local_runs_the_stage(reference_stage4: tuple[Path, Path, str], tmp_path: Path) -> None:
    _, reference_run, _ = reference_stage4
    run = assets_of(reference_run).link_into(tmp_path / "run")
    out = subprocess.run(
        [PYTHON, "-m", "maven_dist.launch", f"{TINY}/stage4.yaml", "--local", "--tasks-per-node", "2",
         "--set", f"run_dir={run}", *STAGE_SETS],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted stage4 locally" in out.stdout
    assert latest_step(run, "stage4") == FINAL_STEP
    assert_same_weights(reference_run, run)


@pytest.mark.slow
def test_recipe_sh_runs_the_four_chained_stages(slurm: None, tiny_assets, tmp_path: Path) -> None:
    """The chain itself (order, afterok, hand-offs): one task per stage job, the stages 2 steps long, the
    prepared tiny assets linked into the run dir (the reference stage builds them inside its job)."""
    run = tiny_assets.link_into(tmp_path / "run")
    env_file = tmp_path / "env.sh"
    local = (REPO / "slurm/env.local.sh").read_text()
    assert "MAVEN_CPU_TASKS_PER_NODE=2" in local
    env_file.write_text(local.replace("MAVEN_CPU_TASKS_PER_NODE=2", "MAVEN_CPU_TASKS_PER_NODE=1"))
    env = job_env(MAVEN_LOG_DIR=str(tmp_path / "logs"), MAVEN_SLURM_ENV=str(env_file))
    out = subprocess.run(
        ["bash", str(REPO / "slurm/recipe.sh"), TINY, "--set", f"run_dir={run}", "--set", "stage.max_steps=2",
         "--set", "stage.eval_every=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    jobs = dict(line.split() for line in out.stdout.splitlines())
    # The order the init_from hand-offs imply (stage 1 trains on the rows stage 2 trained).
    assert list(jobs) == ["stage2", "stage1", "stage3", "stage4"]
    assert f"afterok:{jobs['stage2']}" in job_info(jobs["stage1"]).get("Dependency", "")
    assert f"afterok:{jobs['stage3']}" in job_info(jobs["stage4"]).get("Dependency", "")
    times = []
    for stage, jid in jobs.items():
        info = wait_state(
            jid,
            ("COMPLETED", "FAILED", "CANCELLED"),
            JOB_TIMEOUT_S,
            tmp_path / "logs" / f"maven-{stage}-{jid}.out",
        )
        assert info["JobState"] == "COMPLETED", (tmp_path / "logs" / f"maven-{stage}-{jid}.out").read_text()[
            -4000:
        ]
        assert (run / stage / "export").is_dir() and latest_step(run, stage) == 2
        times.append(
            (info["StartTime"], info["EndTime"])
        )  # read now: Slurm forgets finished jobs (MinJobAge)
    assert all(times[i][1] <= times[i + 1][0] for i in range(3)), times  # one after the other


@pytest.mark.slow
def test_sweep_runs_its_arms_as_one_job_array(slurm: None, tiny_assets, tmp_path: Path) -> None:
    """`maven sweep --slurm` on CPU nodes: the arms are the tasks of one submitit job array, each its arm's
    `maven pipeline`, into one store; `--report-only` then writes the report of both."""
    import yaml

    arms = ["keep_ratio=0.1", "keep_ratio=1.0"]
    spec = {
        "name": "array-test",
        "recipe": str(REPO / TINY),
        "stages": ["stage4"],
        "set": ["demo.enabled=false", "stage.max_steps=2", "checkpoint.every_steps=2", "stage.eval_every=0",
                "eval.enabled=false", "stage.init_missing=base"],
        "grid": {"model.selector.keep_ratio": [0.1, 1.0]},
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = tmp_path / "sweep"
    for arm in arms:  # the prepared tiny assets, linked instead of built again
        tiny_assets.link_into(root / arm)
    sweep = [PYTHON, "-m", "maven_dist.cli", "sweep", str(path), "--out", str(root)]
    out = subprocess.run(
        [*sweep, "--slurm", "--gpus-per-node", "0", "--nproc", "1", "--partition", "debug", "--timeout-min", "30"],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ids = re.search(r"submitted (.+?); when they are done", out.stdout).group(1).split()
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1, ids  # JOB_0 and JOB_1 of one array
    for task in ids:
        info = wait_state(task, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), JOB_TIMEOUT_S)
        logs = "".join(p.read_text()[-2000:] for p in (root / "submitit").rglob(f"{task}_*_log.*"))
        assert info["JobState"] == "COMPLETED", logs
    assert all((root / arm / "arm_finished.json").is_file() for arm in arms)

    report = subprocess.run([*sweep, "--report-only"], cwd=REPO, env=job_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    html = (root / "report" / "report.html").read_text()
    assert all(arm in html for arm in arms)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("array-test")
    stage_runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("maven.stage") == "stage4"
    ]
    assert sorted(r.data.tags["maven.arm"] for r in stage_runs) == arms
    assert all(r.info.status == "FINISHED" for r in stage_runs)


# ------------------------------------------------------------------------------------------ accounting


def test_accounting_mode_lets_submitit_see_a_cancelled_job(slurm: None, tmp_path: Path) -> None:
    """MAVEN_SLURM_ACCOUNTING=1 adds MariaDB + slurmdbd: sacct works, and submitit's results() raises
    for a job that died without a result instead of waiting forever. Runs last: it leaves Slurm in
    accounting mode (stop.sh stops those daemons too)."""
    import threading

    import submitit

    from maven_dist.launch.stage_job import StageJob

    start = [str(REPO / "slurm/local/start.sh")]
    env = {**os.environ, "MAVEN_SLURM_ACCOUNTING": "1"}
    out = subprocess.run(["bash", *start], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    t0 = time.monotonic()
    again = subprocess.run(["bash", *start], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "slurmdbd already running" in again.stderr
    assert time.monotonic() - t0 < 10  # idempotent: a re-run only checks

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(
        nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=60, slurm_partition="debug"
    )
    os.environ["STANDIN_STEPS"] = "1000"
    try:
        job = executor.submit(
            StageJob(str(REPO / TINY / "stage4.yaml"), [f"run_dir={tmp_path / 'run'}"], entry=__file__)
        )
    finally:
        del os.environ["STANDIN_STEPS"]
    wait_state(job.job_id, ("RUNNING",), 120)
    job.cancel()
    outcome: list[BaseException | None] = []

    def collect() -> None:
        try:
            job.results()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    waiter = threading.Thread(target=collect, daemon=True)
    waiter.start()
    waiter.join(180)
    assert outcome, "job.results() still waiting 180 s after scancel, with accounting on"
    assert isinstance(outcome[0], submitit.core.utils.UncompletedJobError), outcome[0]
    sacct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job.job_id], capture_output=True, text=True
    )
    assert sacct.returncode == 0 and f"{job.job_id}|CANCELLED" in sacct.stdout


# ------------------------------------------------------------------------------------------ stand-in


def standin_main(argv: list[str]) -> int:
    """A task for the launcher's plumbing tests ONLY: `RECIPE --set run_dir=DIR ...`.

    Records its torch.distributed variables, counts to $STANDIN_STEPS ($STANDIN_STEP_S seconds per step,
    default 0.5) and, on a preemption signal, saves its step and exits with REQUEUE_EXIT_CODE like the
    trainer does: every rank saves, then rank 0 marks the requeue (the trainer's checkpoint barriers are
    files here). With $STANDIN_DIE_RANK, that rank raises at step $STANDIN_DIE_AT (a rank that dies).
    """
    from maven_dist.contract.preemption import (
        REQUEUE_EXIT_CODE,
        install_preemption_handler,
        mark_requeue_requested,
        preemption_requested,
    )

    install_preemption_handler()
    run = Path([a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")][-1])
    run.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    keys = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MAVEN_LAUNCHER",
        "MAVEN_REQUEUE_COUNT",
    )
    attempt = os.environ.get("MAVEN_REQUEUE_COUNT", "0")
    (run / f"env{rank}.{attempt}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    state = run / f"step{rank}"
    step = int(state.read_text()) if state.exists() else 0
    if step:
        (run / f"resumed{rank}").write_text(str(step))
    steps, step_s = int(os.environ.get("STANDIN_STEPS", "20")), float(os.environ.get("STANDIN_STEP_S", "0.5"))
    die_rank, die_at = os.environ.get("STANDIN_DIE_RANK"), int(os.environ.get("STANDIN_DIE_AT", "3"))
    while step < steps:
        time.sleep(step_s)
        step += 1
        if die_rank == str(rank) and step == die_at:
            raise RuntimeError(f"stand-in rank {rank} died at step {step}")
        if preemption_requested():
            state.write_text(str(step))
            (run / f"saved{rank}").write_text(str(step))
            world = int(os.environ["WORLD_SIZE"])
            while len(list(run.glob("saved*"))) < world:  # the checkpoint is complete on every rank
                time.sleep(0.05)
            if rank == 0:
                mark_requeue_requested()
            return REQUEUE_EXIT_CODE
    state.write_text(str(step))
    return 0


if __name__ == "__main__":
    sys.exit(standin_main(sys.argv[1:]))
