"""slurm/launch.sh's pure parts, run in bash without Slurm: sbatch arguments from the env file,
recipe/argument splitting, and the requeue exit code agreeing with Python's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from maven_dist.contract.preemption import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]


def _bash(script: str, env_file: str, cwd: Path, **env: str) -> list[str]:
    prelude = f"MAVEN_REPO={REPO}; MAVEN_SLURM_ENV={REPO / 'slurm' / env_file}; source {REPO}/slurm/launch.sh; maven_load_env\n"
    out = subprocess.run(
        ["bash", "-c", prelude + script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_requeue_exit_code_matches_python() -> None:
    text = (REPO / "slurm/launch.sh").read_text()
    assert re.search(r"^MAVEN_REQUEUE_EXIT_CODE=(\d+)", text, re.M).group(1) == str(REQUEUE_EXIT_CODE)


def test_sbatch_args_from_the_gpu_env_file(tmp_path: Path) -> None:
    args = _bash('maven_sbatch_args stage4; printf "%s\\n" "${MAVEN_SBATCH_ARGS[@]}"', "env.sh", tmp_path)
    assert "--job-name=maven-stage4" in args and "--nodes=1" in args
    assert "--gpus-per-node=8" in args and "--ntasks-per-node=8" in args  # one task per GPU
    assert "--cpus-per-task=10" in args
    assert f"--output={tmp_path}/logs/slurm/%x-%j.out" in args and (tmp_path / "logs/slurm").is_dir()
    assert f"--export=ALL,MAVEN_REPO={REPO},MAVEN_SLURM_ENV={REPO}/slurm/env.sh" in args
    assert not any(
        a.startswith(("--partition", "--account", "--qos", "--time")) for a in args
    )  # empty in env.sh


def test_sbatch_args_from_the_local_env_file(tmp_path: Path) -> None:
    args = _bash(
        'maven_sbatch_args stage2; printf "%s\\n" "${MAVEN_SBATCH_ARGS[@]}"', "env.local.sh", tmp_path
    )
    assert "--ntasks-per-node=2" in args and "--cpus-per-task=1" in args
    assert not any(a.startswith("--gpus") for a in args)
    assert "--partition=debug" in args and "--time=00:30:00" in args


def test_env_file_exports_sbatch_variables_for_a_plain_sbatch(tmp_path: Path) -> None:
    lines = _bash("env | grep -E '^(SBATCH_|MAVEN_SLURM_ENV=)' | sort", "env.local.sh", tmp_path)
    assert "SBATCH_PARTITION=debug" in lines and "SBATCH_TIMELIMIT=00:30:00" in lines
    assert f"MAVEN_SLURM_ENV={REPO}/slurm/env.local.sh" in lines


def test_split_args_default_recipe_run_dir_and_overrides(tmp_path: Path) -> None:
    show = 'echo "$MAVEN_RECIPE"; echo "${MAVEN_ARGS[*]}"; echo "${MAVEN_SETS[*]}"'
    recipe, args, sets = _bash(f"maven_split_args stage3; {show}", "env.local.sh", tmp_path)
    assert recipe == f"{REPO}/recipes/maven-7b/stage3.yaml"  # not under cwd: the repository's
    assert args == sets == ""
    recipe, args, sets = _bash(
        f"maven_split_args stage4 recipes/tiny/stage4.yaml --set a.b=1 --force --set=c=2; {show}",
        "env.local.sh",
        tmp_path,
        MAVEN_RUN_DIR="/scratch/r",
    )
    assert recipe == f"{REPO}/recipes/tiny/stage4.yaml"
    assert args == "--set run_dir=/scratch/r --set a.b=1 --force --set=c=2"  # the trainer gets all
    assert sets == "--set run_dir=/scratch/r --set a.b=1 --set c=2"  # the checks get the overrides
    (tmp_path / "mine.yaml").write_text("{}")
    recipe, _, _ = _bash(f"maven_split_args stage4 mine.yaml; {show}", "env.local.sh", tmp_path)
    assert recipe == "mine.yaml"  # found in the submit directory first


def test_mlflow_server_script_says_how_to_use_it_and_refuses_unknown_arguments(tmp_path: Path) -> None:
    script = REPO / "slurm" / "mlflow_server.sh"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "MAVEN_TRACKING_URI" in usage.stdout
    bad = subprocess.run(["bash", str(script), "--prot", "1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument --prot" in bad.stderr
