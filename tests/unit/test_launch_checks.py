"""Launch checks: missing recipe, world size vs the recipe's layout, GPUs; as API and as CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maven_dist.config import load_config
from maven_dist.launch.checks import (
    GPU_PARAM_THRESHOLD,
    LaunchError,
    Layout,
    check_launch,
    estimated_llm_params,
    recipe_needs_gpu,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests/recipes/tiny/stage4.yaml")
SEVEN_B = str(REPO / "recipes/maven-7b/stage4.yaml")
CPU2 = Layout(nodes=1, tasks_per_node=2, gpus_per_node=0)


def test_tiny_recipe_passes_on_two_cpu_tasks() -> None:
    cfg = check_launch(TINY, ["run_dir=/tmp/x"], CPU2, visible_gpus=0)
    assert cfg.run_dir == "/tmp/x"


def test_missing_recipe_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "stage4.yaml"
    with pytest.raises(LaunchError, match=rf"recipe {missing} does not exist.*recipes/tiny/stage4.yaml"):
        check_launch(missing, [], CPU2, visible_gpus=0)
    with pytest.raises(LaunchError, match="it is a directory: name one stage file, e.g. .*tiny/stage4.yaml"):
        check_launch(str(REPO / "tests/recipes/tiny"), [], CPU2, visible_gpus=0)


def test_bad_override_is_reported_with_the_recipe() -> None:
    with pytest.raises(LaunchError, match=r"stage4.yaml: .*parallel.tp=0 must be >= 1"):
        check_launch(TINY, ["parallel.tp=0"], CPU2, visible_gpus=0)


def test_world_size_must_be_a_multiple_of_tp_times_pp() -> None:
    tp2 = ["parallel.backend=3d", "parallel.tp=2"]
    check_launch(TINY, tp2, CPU2, visible_gpus=0)  # 2 tasks, tp=2: dp=1
    with pytest.raises(
        LaunchError,
        match=r"world size 3 \(1 node\(s\) x 3 task\(s\)\) is not a multiple of parallel.tp \* parallel.pp = 2 \* 1 = 2",
    ):
        check_launch(TINY, tp2, Layout(1, 3, 0), visible_gpus=0)


def test_global_batch_must_split_over_data_parallel_ranks() -> None:
    # tiny stage 4: global 8, micro 4 -> 3 data-parallel ranks cannot share 8 samples
    with pytest.raises(LaunchError, match=r"global_batch_size=8 .*micro_batch_size \* dp = 4 \* 3 = 12"):
        check_launch(TINY, [], Layout(1, 3, 0), visible_gpus=0)


def test_parameter_estimate_separates_tiny_from_7b() -> None:
    tiny = load_config(TINY)
    seven = load_config(SEVEN_B)
    assert estimated_llm_params(tiny) < 10_000_000
    assert 6e9 < estimated_llm_params(seven) < 7.5e9  # Vicuna-7B: 6.7B
    assert not recipe_needs_gpu(tiny)
    assert recipe_needs_gpu(seven)


def test_pretrained_config_on_disk_wins_over_recipe_shape(tmp_path: Path) -> None:
    llm = tmp_path / "base" / "llm"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text(
        '{"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, '
        '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}'
    )
    cfg = load_config(SEVEN_B, [f"run_dir={tmp_path}", "model.llm.path={run_dir}/base/llm"])
    assert estimated_llm_params(cfg) < GPU_PARAM_THRESHOLD
    assert not recipe_needs_gpu(cfg)


def test_gpu_recipe_without_gpus_is_refused() -> None:
    with pytest.raises(
        LaunchError, match=r"~6\.\dB-parameter LLM, which needs GPUs, but this launch asks for none"
    ):
        check_launch(SEVEN_B, [], Layout(1, 8, 0), visible_gpus=0, inputs=False)
    with pytest.raises(LaunchError, match="needs GPUs, but no CUDA device is visible"):
        check_launch(SEVEN_B, [], Layout(1, 8, 8), visible_gpus=0, inputs=False)
    check_launch(SEVEN_B, [], Layout(1, 8, 8), visible_gpus=8, inputs=False)


def test_requested_gpus_must_exist_and_match_tasks() -> None:
    with pytest.raises(LaunchError, match="1 GPU\\(s\\) per node requested but no CUDA device is visible"):
        check_launch(TINY, [], Layout(1, 1, 1), visible_gpus=0)
    with pytest.raises(LaunchError, match="2 task\\(s\\) per node but 4 GPU\\(s\\) per node"):
        check_launch(TINY, [], Layout(1, 2, 4), visible_gpus=4)
    with pytest.raises(LaunchError, match="4 GPU\\(s\\) per node requested but only 2 visible"):
        check_launch(TINY, ["stage.global_batch_size=16"], Layout(1, 4, 4), visible_gpus=2)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maven_dist.launch.checks", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_exit_codes_and_messages(tmp_path: Path) -> None:
    ok = _cli(TINY, "--nodes", "1", "--tasks-per-node", "2", "--set", f"run_dir={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    assert "world size 2" in ok.stdout and f"run_dir={tmp_path}" in ok.stdout
    bad = _cli(str(tmp_path / "missing.yaml"), "--nodes", "1", "--tasks-per-node", "2")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: recipe ") and "missing.yaml does not exist" in bad.stderr
    # --visible-gpus: the submitting machine vouches for the compute nodes' GPUs
    gpu = _cli(
        SEVEN_B, "--nodes", "1", "--tasks-per-node", "8", "--gpus-per-node", "8", "--visible-gpus", "8",
        "--skip-inputs",
    )  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr


def _maven_launch_check(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "maven_dist.cli", "launch", "--check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_launch_check_validates_every_stage_and_names_a_missing_shard_directory(tiny_assets, tmp_path):
    """Demo assets in place of a cluster's files: every stage's models, shards and columns are found; one
    stage pointed at a missing shard directory fails at once, naming it and the command that makes it."""
    ready = ["--set", f"run_dir={tiny_assets.root}", "--set", "demo.enabled=false"]
    ok = _maven_launch_check("tests/recipes/tiny", *ready)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok: ") == 4
    missing = tmp_path / "shards" / "llava_665k"
    bad = _maven_launch_check("tests/recipes/tiny/stage4.yaml", *ready, "--set", f"data.path={missing}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"data.path={missing} holds no shards" in bad.stderr and "maven prepare" in bad.stderr
    nolabels = _maven_launch_check(
        "tests/recipes/tiny/stage1.yaml", *ready, "--set", f"data.path={tiny_assets.root}/data/conversations"
    )
    assert nolabels.returncode == 2 and "'patch_labels'" in nolabels.stderr, nolabels.stderr
