"""`maven labels` / `maven tokenize` split over processes (--num-shards N --shard-index I) and their Slurm
arrays (slurm/labels_array.sh, slurm/tokenize_array.sh): the parts are disjoint, every part writes only
its own files, and the union of the parts is a single-process run byte for byte (issue 17)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from maven_dist.cli import main
from maven_dist.data.shards import list_shards, read_shard_schema
from maven_dist.offline.shard_jobs import JobInputError, WorkShare, plan_shard_files
from maven_dist.offline.synthetic import generate_synthetic
from tests.unit.test_discrete_kmeans import save_tiny_tower
from tests.unit.test_pseudo_labels import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards directories (4 and 2 shard files), one image in each that COCO does not annotate."""
    root = tmp_path_factory.mktemp("split")
    syn = generate_synthetic(root / "syn", num_images=10, seed=2)
    write_synthetic_shards(syn, root / "inputs" / "coco", per_shard=3, extra_paths={4: "unknown/zzz.png"})
    write_synthetic_shards(syn, root / "inputs" / "vg", per_shard=5, extra_paths={7: "unknown/yyy.png"})
    return root, syn


def _copy_inputs(data, where: Path) -> list[Path]:
    root, _ = data
    shutil.copytree(root / "inputs", where)
    return [where / "coco", where / "vg"]


def _tree(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def _labels(dirs: list[Path], syn, *extra: str) -> int:
    args = ["labels", *map(str, dirs), "--source", "coco", "--annotations", str(syn.instances_json)]
    return main([*args, "--grid", "6", *extra])


# --------------------------------------------------------------------------- the split itself


def test_parts_are_disjoint_cover_every_file_and_stride_across_directories(data, tmp_path):
    dirs = _copy_inputs(data, tmp_path / "d")
    every = [f for d in dirs for f in list_shards(d)]
    for count in (1, 2, 3, 4, 7):
        parts = [plan_shard_files(dirs, WorkShare(i, count)) for i in range(count)]
        files = [f for part in parts for f in part.files]
        assert sorted(files) == sorted(every) and len(files) == len(every)  # disjoint, and all of them
        assert all(part.total == 6 for part in parts)
        for i, part in enumerate(parts):
            assert part.files == every[i::count]  # one list over both directories, in the order given
    assert plan_shard_files(dirs, WorkShare(6, 7)).files == []  # more parts than files: some do nothing
    assert (
        plan_shard_files(dirs, WorkShare(1, 3)).describe()
        == "part 1 of 3: 2 of 6 shard files in 2 directories"
    )
    with pytest.raises(JobInputError, match="does not exist"):
        plan_shard_files([*dirs, tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobInputError, match=r"no shard-\*\.arrow files in .*empty: run `maven prepare"):
        plan_shard_files([tmp_path / "empty"])


@pytest.mark.parametrize(("index", "count"), [(0, 0), (3, 3), (-1, 2), (0, -2)])
def test_work_share_refuses_parts_that_do_not_exist(index, count):
    with pytest.raises(ValueError, match="must be"):
        WorkShare(index, count)


@pytest.mark.parametrize("tool", ["labels", "tokenize"])
@pytest.mark.parametrize(
    ("split", "message"),
    [
        (["--num-shards", "0"], "--shard-index 0 of --num-shards 0: the count must be at least 1, got 0"),
        (
            ["--num-shards", "3", "--shard-index", "3"],
            "--shard-index 3 of --num-shards 3: the index must be in 0 .. 2",
        ),
        (["--shard-index", "-1"], "--shard-index -1 of --num-shards 1: the index must be in 0 .. 0"),
    ],
)
def test_a_part_that_does_not_exist_is_a_usage_error(tool, split, message, tmp_path, capsys):
    args = {
        "labels": ["--source", "coco", "--annotations", str(tmp_path), "--grid", "4"],
        "tokenize": ["--tokenizer", "seed", "--path", str(tmp_path)],
    }[tool]
    assert main([tool, str(tmp_path), *args, *split]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- outputs: parts == one process


def test_labels_in_n_parts_equal_one_process_byte_for_byte(data, tmp_path, capsys):
    _, syn = data
    one = _copy_inputs(data, tmp_path / "one")
    assert _labels(one, syn) == 0
    expected = _tree(tmp_path / "one")
    assert "coco/patch_labels_rejects/shard-00001.jsonl" in expected  # the unannotated image
    assert "vg/patch_labels_rejects/shard-00001.jsonl" in expected
    for count in (2, 3):
        dirs = _copy_inputs(data, tmp_path / f"parts{count}")
        for index in range(count):
            assert _labels(dirs, syn, "--num-shards", str(count), "--shard-index", str(index)) == 0
            if index == 0:  # part 0 wrote its own shard files and nobody else's
                done = [
                    f for d in dirs for f in list_shards(d) if "patch_labels" in read_shard_schema(f).names
                ]
                assert done == plan_shard_files(dirs, WorkShare(0, count)).files
        assert _tree(tmp_path / f"parts{count}") == expected, f"{count} parts differ from one process"
    assert "labelled part 2 of 3: 2 of 6 shard files in 2 directories" in capsys.readouterr().out


def test_a_rerun_with_another_split_finishes_what_is_missing(data, tmp_path):
    _, syn = data
    one = _copy_inputs(data, tmp_path / "one")
    assert _labels(one, syn) == 0
    dirs = _copy_inputs(data, tmp_path / "mixed")
    assert _labels(dirs, syn, "--num-shards", "3", "--shard-index", "1") == 0  # say the other two died
    for index in range(2):  # rerun as two parts: each skips what is done and labels the rest
        assert _labels(dirs, syn, "--num-shards", "2", "--shard-index", str(index)) == 0
    assert _tree(tmp_path / "mixed") == _tree(tmp_path / "one")


def test_tokenize_in_n_parts_equals_one_process_byte_for_byte(data, tmp_path):
    tower = save_tiny_tower(tmp_path / "tower")
    kmeans = tmp_path / "kmeans"
    one = _copy_inputs(data, tmp_path / "one")
    fit = ["--train-kmeans", "--tower", str(tower), "--codebook-size", "16", "--num-codes", "8"]
    assert main(["tokenize", *map(str, one), "--tokenizer", "kmeans", "--path", str(kmeans), *fit]) == 0
    expected = _tree(tmp_path / "one")
    for count in (2, 3):
        dirs = _copy_inputs(data, tmp_path / f"parts{count}")
        for index in range(count):
            split = ["--num-shards", str(count), "--shard-index", str(index)]
            assert (
                main(["tokenize", *map(str, dirs), "--tokenizer", "kmeans", "--path", str(kmeans), *split])
                == 0
            )
        assert _tree(tmp_path / f"parts{count}") == expected, f"{count} parts differ from one process"


def test_fitting_kmeans_is_not_split(data, tmp_path, capsys):
    dirs = _copy_inputs(data, tmp_path / "d")
    args = ["tokenize", *map(str, dirs), "--tokenizer", "kmeans", "--path", str(tmp_path / "km")]
    args += ["--train-kmeans", "--tower", str(tmp_path), "--num-shards", "2"]
    assert main(args) == 2
    assert "has no tokenizer yet; fit it once first" in capsys.readouterr().err
    assert not (tmp_path / "km").exists()


def test_dry_run_lists_this_part_and_writes_nothing(data, tmp_path, capsys):
    _, syn = data
    dirs = _copy_inputs(data, tmp_path / "d")
    before = _tree(tmp_path / "d")
    assert _labels(dirs, syn, "--num-shards", "4", "--shard-index", "1", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [str(dirs[0] / "shard-00001.arrow"), str(dirs[1] / "shard-00001.arrow"),
                     "would label part 1 of 4: 2 of 6 shard files in 2 directories"]  # fmt: skip
    assert _tree(tmp_path / "d") == before


# --------------------------------------------------------------------------- the Slurm arrays


def _script(
    script: str, args: list[str], cwd: Path, env_file: str, **env: str
) -> subprocess.CompletedProcess:
    """Run slurm/<script> outside Slurm, with a stand-in sbatch that records its arguments."""
    bin_dir = cwd / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SBATCH_ARGS"\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd), "SBATCH_ARGS": str(cwd / "sbatch.args")}
    base |= {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in os.environ}
    base["MAVEN_SLURM_ENV"] = str(REPO / "slurm" / env_file)
    return subprocess.run(
        ["bash", str(REPO / "slurm" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=base | env,
    )


def test_array_scripts_submit_themselves_with_the_env_files_settings(data, tmp_path):
    _, syn = data
    dirs = _copy_inputs(data, tmp_path / "d")
    labels = [*map(str, dirs), "--source", "coco", "--annotations", str(syn.instances_json), "--grid", "6"]
    out = _script("labels_array.sh", [*labels, "--num-shards", "3"], tmp_path, "env.sh")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4242"
    sent = (tmp_path / "sbatch.args").read_text().splitlines()
    assert "--array=0-2" in sent and "--ntasks=1" in sent and "--job-name=maven-labels" in sent
    assert f"--output={tmp_path}/logs/slurm/%x-%A_%a.out" in sent
    assert not any(a.startswith("--gpus") for a in sent)  # COCO masks need no GPU
    assert sent[sent.index(str(REPO / "slurm/labels_array.sh")) + 1 :] == [*labels, "--num-shards", "3"]
    assert not any("patch_labels" in read_shard_schema(f).names for d in dirs for f in list_shards(d))

    tokenize = [*map(str, dirs), "--tokenizer", "seed", "--path", str(tmp_path), "--num-shards", "8"]
    out = _script("tokenize_array.sh", tokenize, tmp_path, "env.local.sh", MAVEN_ARRAY_MAX_RUNNING="2")
    assert out.returncode == 0, out.stderr
    sent = (tmp_path / "sbatch.args").read_text().splitlines()
    assert "--array=0-7%2" in sent and "--partition=debug" in sent and "--time=00:30:00" in sent
    assert not any(a.startswith("--gpus") for a in sent)  # the local env file has no GPUs
    out = _script("tokenize_array.sh", tokenize, tmp_path, "env.sh")
    assert "--gpus-per-node=1" in (tmp_path / "sbatch.args").read_text().splitlines()  # one per task


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say how many array tasks to split the work into: add --num-shards N"),
        (["--num-shards", "two"], "--num-shards two: give the number of array tasks"),
        (["--num-shards", "2", "--shard-index", "1"], "--shard-index comes from each array task's id"),
        (
            ["--num-shards", "2", "--source", "coco", "--grid", "6"],
            "--source coco needs --annotations",
        ),  # the tool's own check
    ],
)
def test_array_submission_refuses_bad_arguments_before_queueing(args, message, data, tmp_path):
    dirs = _copy_inputs(data, tmp_path / "d")
    base = [] if "--source" in args else ["--source", "vg", "--annotations", str(tmp_path), "--grid", "6"]
    out = _script("labels_array.sh", [str(dirs[0]), *base, *args], tmp_path, "env.local.sh")
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "sbatch.args").exists()


def _task(index: int, count: int, minimum: int = 0) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": str(100 + index),
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": str(index),
        "SLURM_ARRAY_TASK_MIN": str(minimum),
        "SLURM_ARRAY_TASK_MAX": str(minimum + count - 1),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "MAVEN_REPO": str(REPO),
    }


def test_array_tasks_together_label_like_one_process(data, tmp_path):
    _, syn = data
    one = _copy_inputs(data, tmp_path / "one")
    assert _labels(one, syn) == 0
    dirs = _copy_inputs(data, tmp_path / "array")
    labels = [*map(str, dirs), "--source", "coco", "--annotations", str(syn.instances_json), "--grid", "6"]
    for index in range(2):  # `sbatch --array=0-1 slurm/labels_array.sh ...`: N is the array's size
        out = _script("labels_array.sh", labels, tmp_path, "env.local.sh", **_task(index, 2))
        assert out.returncode == 0, out.stderr
        assert f"--num-shards 2 --shard-index {index}" in out.stderr  # the task says what it runs
    assert _tree(tmp_path / "array") == _tree(tmp_path / "one")


@pytest.mark.parametrize(
    ("task", "args", "message"),
    [
        (_task(2, 2, minimum=1), [], "array ids 1..2 (2 tasks) are not 0..1: submit with --array=0-1"),
        (_task(0, 2), ["--shard-index", "1"], "--shard-index comes from the array task id (0): leave it out"),
        ({"SLURM_JOB_ID": "5", "MAVEN_REPO": str(REPO)}, [], "job 5 is not an array job"),
    ],
)
def test_array_tasks_refuse_an_array_that_is_not_the_split(task, args, message, data, tmp_path):
    dirs = _copy_inputs(data, tmp_path / "d")
    labels = [str(dirs[0]), "--source", "vg", "--annotations", str(tmp_path), "--grid", "6", *args]
    out = _script("labels_array.sh", labels, tmp_path, "env.local.sh", **task)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_one_task_of_a_split_runs_again_with_num_shards_given(data, tmp_path):
    _, syn = data
    dirs = _copy_inputs(data, tmp_path / "d")
    labels = [*map(str, dirs), "--source", "coco", "--annotations", str(syn.instances_json), "--grid", "6"]
    # `sbatch --array=4 slurm/labels_array.sh ... --num-shards 5`: task 4 of a 5-way split, alone
    out = _script(
        "labels_array.sh", [*labels, "--num-shards", "5"], tmp_path, "env.local.sh", **_task(4, 1, 4)
    )
    assert out.returncode == 0, out.stderr
    done = [f for d in dirs for f in list_shards(d) if "patch_labels" in read_shard_schema(f).names]
    assert done == plan_shard_files(dirs, WorkShare(4, 5)).files == [dirs[1] / "shard-00000.arrow"]


def test_array_scripts_say_how_to_use_them(tmp_path):
    for script in ("labels_array.sh", "tokenize_array.sh"):
        usage = subprocess.run(
            ["bash", str(REPO / "slurm" / script), "--help"], capture_output=True, text=True
        )
        assert (
            usage.returncode == 0
            and f"bash slurm/{script}" in usage.stdout
            and "--job-name" not in usage.stdout
        )
        assert subprocess.run(["bash", str(REPO / "slurm" / script)], capture_output=True).returncode == 2
