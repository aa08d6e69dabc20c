"""Run a sweep: the shared stages once, then every arm's stages as one ``maven pipeline``, into one store.

Layout under the sweep's folder (``--out``, default ``runs/sweeps/<name>``)::

    mlflow.db              the sweep's store (unless the sweep sets tracking.uri: a shared server)
    shared/                run_dir of the shared stages (when the sweep has ``shared:``)
    <arm>/                 run_dir of each arm; its first stage after the shared ones starts from them
    <arm>/base, <arm>/data links to shared/ (recipes with ``demo.enabled``, when the arm's demo settings
                           are the shared stages'): the demo assets are built once per sweep, not per arm
    <arm>/arm_finished.json   the arm's settings, once its pipeline ended with exit code 0
    report/                the comparison report (report.html, report.md, report.csv, PNG curves)

Each arm is a launch of its own (its run_dir's launch id), tagged ``maven.sweep`` and ``maven.arm`` and
named ``<sweep>/<arm>`` in MLflow. Rerunning the same command skips every arm (and the shared stages)
that finished with the same settings, and resumes the others from their checkpoints into the same MLflow
runs (``maven pipeline`` does: launch ids belong to run directories, finished stages are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from maven_dist.sweep.spec import Arm, Sweep
from maven_dist.train.tracking.run_info import ARM_ENV, RUN_NAME_ENV, SWEEP_ENV, TRACKING_URI_ENV

ARM_FINISHED = "arm_finished.json"
SHARED = "shared"
DEMO_ASSETS = ("base", "data")
"""The run-directory folders ``prepare_demo`` builds (base models, shards)."""


@dataclass(frozen=True)
class Job:
    """One ``maven pipeline`` run: an arm, or the shared stages."""

    arm: str
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    fingerprint: str
    demo_assets_from: Path | None = None
    """The run directory whose demo assets this job links instead of building its own (None: its own)."""

    def finished(self) -> bool:
        try:
            return json.loads((self.run_dir / ARM_FINISHED).read_text())["fingerprint"] == self.fingerprint
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def prepare_run_dir(self) -> None:
        """Create the run directory, with the demo assets linked from ``demo_assets_from`` if set. A link
        to the shared stages' assets left by an earlier run whose demo settings no longer match is
        removed, so that the job builds its own instead of rebuilding the shared ones through the link;
        anything else already there (a folder the job built, a link someone made) stays."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for part in DEMO_ASSETS:
            link = self.run_dir / part
            ours = link.is_symlink() and Path(os.readlink(link)) == self.run_dir.parent / SHARED / part
            if ours and self.demo_assets_from is None:
                link.unlink()
            elif self.demo_assets_from is not None and not link.exists() and not link.is_symlink():
                link.symlink_to(self.demo_assets_from / part, target_is_directory=True)

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
    shared_demo = _demo_settings(sweep, sweep.shared[0], common) if shared else None
    for arm in sweep.arms:
        hand_offs = [
            f"{stage}:stage.init_from={root / SHARED / init / 'export'}" for stage, init in _inits(sweep, own)
        ]
        sets = common + list(arm.overrides)
        job = _job(sweep, arm.name, root / arm.name, own, sets, hand_offs + list(arm.stage_overrides), nproc)
        if shared_demo is not None and own and _demo_settings(sweep, own[0], sets) == shared_demo:
            job = dataclasses.replace(job, demo_assets_from=shared.run_dir)
        arms.append(job)
    return shared, arms


def _demo_settings(sweep: Sweep, stage: str, sets: list[str]) -> dict | None:
    """What a job's demo assets are built from (None: the recipe builds none)."""
    from maven_dist.config import load_config
    from maven_dist.offline.demo import demo_settings

    cfg = load_config(sweep.recipe / f"{stage}.yaml", sets)
    return demo_settings(cfg) if cfg.demo.enabled else None


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
        job.prepare_run_dir()
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
