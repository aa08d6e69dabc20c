"""merge_ckpt on real 3D (TP x PP) checkpoints written by the trainer on 2 and 4 gloo ranks.

One two-step stage-4 run per layout (tp2, pp2, tp2 x pp2) with a checkpoint every step; the stage's
export (``ThreeDEngine.export_state_dict()`` gathered to rank 0 and written by
``MavenModel.save_pretrained``) is the unsharded model at the final step. Merging the final
checkpoint must give byte-identical weight files; merging the earlier step must not (so the
equality is not the untrained weights agreeing). Errors: a missing and a truncated layer file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maven_dist.merge import PROVENANCE_FILE, MergeError, MergeOptions, merge_checkpoint
from maven_dist.model import hf_layout
from tests.helpers.torchrun import run_train

pytestmark = pytest.mark.distributed

# (tp, pp, dp). dp = 3 (issue 17): the stage export at a data-parallel size that divides no tiny shape.
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2xpp2": (2, 2, 1), "dp3": (1, 1, 3)}
WEIGHT_FILES = [
    f"{hf_layout.LLM_DIR}/model.safetensors",
    f"{hf_layout.TOWER_DIR}/model.safetensors",
    hf_layout.MAVEN_MODULES_FILE,
]
OPTIONS = MergeOptions(progress=False)
_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def three_d_run(tiny_assets, tmp_path_factory):
    """run(layout) -> run directory of a 2-step 3D stage-4 run (checkpoints at steps 1 and 2, export)."""

    def run(layout: str) -> Path:
        if layout not in _RUNS:
            tp, pp, dp = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp(f"merge_3d_{layout}")
            batch = ["stage.micro_batch_size=4", "stage.global_batch_size=12"] if dp == 3 else []
            run_train(
                tp * pp * dp,
                "tests/recipes/tiny/stage4.yaml",
                tiny_assets.overrides(run_dir, "conversations")
                + batch
                + [
                    "parallel.backend=3d",
                    f"parallel.tp={tp}",
                    f"parallel.pp={pp}",
                    "stage.max_steps=2",
                    "checkpoint.every_steps=1",
                    "stage.init_missing=base",
                    "tracking.enabled=false",
                ],
            )
            _RUNS[layout] = run_dir
        return _RUNS[layout]

    yield run
    _RUNS.clear()


def checkpoint_of(run_dir: Path, step: int) -> Path:
    return run_dir / "stage4" / "checkpoints" / f"step_{step:08d}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_3d_checkpoint_merges_bitwise_equal_to_the_unsharded_model(three_d_run, tmp_path, layout):
    run_dir = three_d_run(layout)
    tp, pp, dp = LAYOUTS[layout]
    engine = checkpoint_of(run_dir, 2) / "engine" / "3d"
    # The checkpoint really is sharded: one file per pipeline layer (tiny LLM: 2 blocks) and tp rank,
    # a column-parallel weight cut in tp pieces.
    assert sorted(p.name for p in engine.glob("layer_*")) == [
        f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(4) for r in range(tp)
    ]
    q_slice = torch.load(engine / "layer_01-model_00-model_states.pt", weights_only=True)[
        "self_attn.q_proj.weight"
    ]

    result = merge_checkpoint(run_dir, tmp_path / "merged", OPTIONS)
    assert (result.kind, result.step) == ("3d", 2)
    export = run_dir / "stage4" / "export"
    for relpath in WEIGHT_FILES:
        assert (tmp_path / "merged" / relpath).read_bytes() == (export / relpath).read_bytes(), relpath
    llm = load_file(tmp_path / "merged" / f"{hf_layout.LLM_DIR}/model.safetensors")
    q = llm["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape[0] == tp * q_slice.shape[0] and torch.equal(q[: q_slice.shape[0]], q_slice)
    provenance = json.loads((tmp_path / "merged" / PROVENANCE_FILE).read_text())
    assert provenance["kind"] == "3d" and provenance["layout"] == {"dp": dp, "tp": tp, "pp": pp}
    assert provenance["complete"] is True

    # The step-1 checkpoint merges to other LLM weights: the equality above is of trained weights.
    earlier = merge_checkpoint(checkpoint_of(run_dir, 1), tmp_path / "step1", OPTIONS)
    assert earlier.step == 1
    relpath = f"{hf_layout.LLM_DIR}/model.safetensors"
    assert (tmp_path / "step1" / relpath).read_bytes() != (export / relpath).read_bytes()


def test_3d_exclude_frozen_keeps_what_stage4_trained(three_d_run, tmp_path):
    run_dir = three_d_run("tp2")
    merge_checkpoint(run_dir, tmp_path / "trained", MergeOptions(progress=False, exclude_frozen=True))
    modules = load_file(tmp_path / "trained" / hf_layout.MAVEN_MODULES_FILE)
    assert modules and all(k.startswith("projector.") for k in modules)  # the selector is frozen in stage 4
    assert not (tmp_path / "trained" / hf_layout.TOWER_DIR / "model.safetensors").exists()
    export = load_file(run_dir / "stage4" / "export" / hf_layout.MAVEN_MODULES_FILE)
    assert all(torch.equal(v, export[k]) for k, v in modules.items())


@pytest.fixture
def damaged(three_d_run, tmp_path):
    """A copy of the tp2 run's final checkpoint to break."""
    ckpt = tmp_path / "stage4" / "checkpoints" / "step_00000002"
    shutil.copytree(checkpoint_of(three_d_run("tp2"), 2), ckpt)
    return ckpt


def test_missing_layer_file_is_named(damaged, tmp_path):
    (damaged / "engine" / "3d" / "layer_02-model_01-model_states.pt").unlink()
    with pytest.raises(
        MergeError, match=r"lacks 1 file\(s\).*layer_02-model_01-model_states\.pt.*copy them from the run"
    ):
        merge_checkpoint(damaged, tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.merging").exists()


def test_truncated_layer_file_is_named(damaged, tmp_path):
    path = damaged / "engine" / "3d" / "layer_03-model_00-model_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MergeError, match=r"layer_03-model_00-model_states\.pt is truncated"):
        merge_checkpoint(damaged, tmp_path / "out", OPTIONS)


def test_layout_that_does_not_match_the_files_is_refused(damaged, tmp_path):
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["layout"] = {"dp": 1, "tp": 4, "pp": 1}
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MergeError, match=r"tp=4.*lacks"):
        merge_checkpoint(damaged, tmp_path / "out", OPTIONS)
