"""`maven sweep`'s plan: arms whose demo settings are the shared stages' link the shared demo assets
(built once per sweep, the same shards in every arm); an arm whose settings differ builds its own."""

from __future__ import annotations

import yaml

from maven_dist.sweep.runner import SHARED, plan_jobs
from maven_dist.sweep.spec import load_sweep
from tests.helpers.torchrun import REPO


def plan(tmp_path, grid: dict):
    spec = {
        "name": "s",
        "recipe": str(REPO / "tests" / "recipes" / "tiny"),
        "shared": ["stage2", "stage1"],
        "grid": grid,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return plan_jobs(load_sweep(path), tmp_path / "sweep", nproc=1)


def test_arms_with_the_shared_demo_settings_link_the_shared_assets(tmp_path):
    shared, arms = plan(tmp_path, {"model.selector.keep_ratio": [0.1, 1.0]})
    assert shared.demo_assets_from is None
    assert [a.demo_assets_from for a in arms] == [shared.run_dir, shared.run_dir]
    arm = arms[0]
    arm.prepare_run_dir()
    for part in ("base", "data"):
        assert (arm.run_dir / part).resolve() == shared.run_dir / part
    arm.prepare_run_dir()  # a rerun keeps the links
    assert (arm.run_dir / "base").is_symlink()


def test_arms_with_other_demo_settings_build_their_own(tmp_path):
    _, arms = plan(tmp_path, {"demo.num_images": [96, 160]})
    own, same = arms
    assert own.demo_assets_from is None and same.demo_assets_from is not None
    # The links an earlier run made go once the settings differ; a folder the arm built stays.
    own.run_dir.mkdir(parents=True)
    (own.run_dir / "base").symlink_to(own.run_dir.parent / SHARED / "base")
    (own.run_dir / "data").mkdir()
    own.prepare_run_dir()
    assert not (own.run_dir / "base").exists() and not (own.run_dir / "base").is_symlink()
    assert (own.run_dir / "data").is_dir() and not (own.run_dir / "data").is_symlink()


def test_recipes_without_demo_assets_link_nothing(tmp_path):
    _, arms = plan(tmp_path, {"model.selector.keep_ratio": [0.1], "demo.enabled": [False]})
    assert arms[0].demo_assets_from is None


def test_the_tiny_keep_ratio_sweep_shares_one_set_of_assets(tmp_path):
    """make sweep-demo: every arm trains on the shared stages' shards (the same data, built once)."""
    shared, arms = plan_jobs(load_sweep(REPO / "recipes/ablations/tiny-keep-ratio.yaml"), tmp_path, nproc=2)
    assert [a.arm for a in arms] == ["keep_ratio=0.1", "keep_ratio=0.25", "keep_ratio=1.0"]
    assert all(a.demo_assets_from == shared.run_dir for a in arms)
