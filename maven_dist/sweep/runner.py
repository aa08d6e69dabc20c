"""Run a sweep: the shared stages once, then every arm's stages as one ``maven pipeline``, into one store.

Layout under the sweep's folder (``--out``, default ``runs/sweeps/<name>``)::

    mlflow.db              the sweep's store (unless the sweep sets tracking.uri: a shared server)
    shared/                run_dir of the shared stages (when the sweep has ``shared:``)
    <arm>/                 run_dir of each arm; its first stage after the shared ones starts from them
    <arm>/arm_finished.json   the arm's settings, once its pipeline ended with exit code 0
    report/                the comparison report (report.html, report.md, report.csv, PNG curves)

Each arm is a launch of its own (its run_dir's launch id), tagged ``maven.sweep`` and ``maven.arm`` and
named ``<sweep>/<arm>`` in MLflow. Rerunning the same command skips every arm (and the shared stages)
that finished with the same settings, and resumes the others from their checkpoints into the same MLflow
runs (``maven pipeline`` does: launch ids belong to run directories, finished stages are skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from maven_dist.sweep.spec import Arm, Sweep
from maven_dist.train.tracking import TRACKING_URI_ENV
from maven_dist.train.tracking.run_info import ARM_ENV, RUN_NAME_ENV, SWEEP_ENV

ARM_FINISHED = "arm_finished.json"
SHARED = "shared"


@dataclass(frozen=True)
class Job:
    """One ``maven pipeline`` run: an arm, or the shared stages."""

    arm: str
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    fingerprint: str

    def finished(self) -> bool:
        try:
            return json.loads((self.run_dir / ARM_FINISHED).read_text())["fingerprint"] == self.fingerprint
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def mark_finished(self) -> None:
        tmp = self.run_dir / (ARM_FINISHED + ".tmp")
        tmp.write_text(json.dumps({"arm": self.arm, "fingerprint": self.fingerprint}) + "\n")
        tmp.replace(self.run_dir / ARM_FINISHED)


def tracking_uri(sweep: Sweep, root: Path) -> str:
    """The sweep's store: its own ``tracking.uri`` setting, else ``$MAVEN_TRACKING_URI`` (a cluster's shared
    server), else ``ROOT/mlflow.db``."""
    for item in sweep.overrides:
        key, _, value = item.partition("=")
        if key == "tracking.uri" and value:
            return value
    return os.environ.get(TRACKING_URI_ENV, "").strip() or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def plan_jobs(sweep: Sweep, root: Path, nproc: int) -> tuple[Job | None, list[Job]]:
    """The shared-stages job (None without ``shared:``) and one job per arm, in the sweep's order."""
    root = root.resolve()
    common = [*sweep.overrides, f"tracking.uri={tracking_uri(sweep, root)}"]
    common.append(f"tracking.experiment={sweep.experiment}")
    own = [s for s in sweep.stages if s not in sweep.shared]
    shared = None
    if sweep.shared:
        # The recipe's evaluation scores the arms' models, not the stages they start from.
        shared = _job(
            sweep, SHARED, root / SHARED, list(sweep.shared), [*common, "eval.enabled=false"], [], nproc
        )
    arms = []
    for arm in sweep.arms:
        hand_offs = [
            f"{stage}:stage.init_from={root / SHARED / init / 'export'}" for stage, init in _inits(sweep, own)
        ]
        arms.append(_job(sweep, arm.name, root / arm.name, own, common + list(arm.overrides),
                         hand_offs + list(arm.stage_overrides), nproc))  # fmt: skip
    return shared, arms


def _inits(sweep: Sweep, own: list[str]) -> list[tuple[str, str]]:
    """(stage, shared stage it starts from) for the arms' stages whose ``init_from`` is a shared stage."""
    from maven_dist.config import load_config

    out = []
    for stage in own:
        init = load_config(sweep.recipe / f"{stage}.yaml", list(sweep.overrides)).stage.init_from
        if init in sweep.shared:
            out.append((stage, init))
    return out


def _job(sweep: Sweep, arm: str, run_dir: Path, stages: list[str], sets, stage_sets, nproc: int) -> Job:
    command = [sys.executable, "-m", "maven_dist.pipeline", str(sweep.recipe), "--nproc", str(nproc)]
    command += ["--stages", ",".join(stages), f"--set=run_dir={run_dir}"]
    command += [f"--set={s}" for s in sets] + [f"--stage-set={s}" for s in stage_sets]
    env = {SWEEP_ENV: sweep.name, ARM_ENV: arm, RUN_NAME_ENV: f"{sweep.name}/{arm}"}
    fingerprint = Arm(arm, tuple(sets), tuple(stage_sets)).fingerprint() + f" stages={stages}"
    return Job(arm, run_dir, command, env, fingerprint)


def run_local(jobs: list[Job]) -> int:
    """Run the jobs one after the other on this machine; the first failure stops the sweep (its exit code)."""
    for job in jobs:
        if job.finished():
            print(f"[sweep] {job.arm}: already finished with these settings; skipped", flush=True)
            continue
        job.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[sweep] {job.arm}: {' '.join(job.command)}", flush=True)
        code = subprocess.call(job.command, env=os.environ | job.env)
        if code != 0:
            print(
                f"[sweep] {job.arm} failed with exit code {code}; rerun the same command to resume it",
                file=sys.stderr,
            )
            return code
        job.mark_finished()
    return 0
