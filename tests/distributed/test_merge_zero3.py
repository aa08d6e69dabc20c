"""merge_ckpt on real ZeRO-3 checkpoints saved by 1, 2 and 4 gloo ranks.

* bitwise equal to DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (and byte-identical to
  ``MavenModel.save_pretrained`` of that state dict), from torch's legacy and zip file formats;
* the merged directory loads with ``MavenModel.from_pretrained`` and, for its LLM, with plain
  ``AutoModelForCausalLM``/``AutoTokenizer``, and gives the training model's logits;
* one test per error: missing rank files, mixed tags, truncated and corrupt files, a world size that
  does not match the files.

Run as a module under torchrun, this file is also the worker that trains one ZeRO-3 step and saves
the checkpoint with the project's CheckpointManager (argv: BASE_DIR RUN_DIR).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from maven_dist.merge import MergeError, MergeOptions, merge_checkpoint  # noqa: E402
from maven_dist.model import hf_layout  # noqa: E402
from tests.helpers.torchrun import torchrun  # noqa: E402

STAGE = "stage4"  # trains llm, vocab_new_rows and projector: frozen tower and selector exercise the frozen fragments
PROBE_IDS = [[1, 5, 9, 17, 33], [2, 40, 3, 7, 11]]  # text ids; the image-token ids are appended per layout


# ---------------------------------------------------------------------- worker (runs under torchrun)


def probe_ids(layout) -> torch.Tensor:
    ids = torch.tensor(PROBE_IDS)
    new = torch.tensor(
        [[layout.img_start_id, layout.text_size + 5], [layout.text_size + 20, layout.img_end_id]]
    )
    return torch.cat([ids, new], dim=1)


def unified_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The training model's unified-vocabulary logits for token ids."""
    hidden = model.llm.model(inputs_embeds=model.embed_tokens(ids), use_cache=False).last_hidden_state
    return model.logits(hidden)


def worker(base_dir: Path, run_dir: Path) -> None:
    import dataclasses

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from maven_dist.contract.vocab import extend_tokenizer
    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.distributed import init_distributed
    from maven_dist.parallel.zero3 import Zero3Engine
    from maven_dist.train.checkpoint import CheckpointManager
    from tests.distributed.engine_fixtures import build_stage_setup, micro_batches
    from tests.helpers.steps import FixedState, train_steps

    torch.set_num_threads(1)
    env = init_distributed()
    setup = build_stage_setup(base_dir, STAGE)
    dims = ParallelDims.build(setup.cfg.parallel, env.world_size)
    # One micro-batch per rank and step, whatever the world size (the global batch is not under test).
    engine = Zero3Engine(setup.builder, setup.cfg, dims, total_steps=2, accumulation=1)
    batches = micro_batches(setup, 2 * env.world_size)
    train_steps(engine, lambda step: [batches[step * env.world_size + env.rank]], range(2))
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "llm")
    extend_tokenizer(
        tokenizer, setup.cfg.model.discrete.codebook_size, setup.cfg.model.vocab.pad_to_multiple_of
    )
    skeleton = run_dir / "skeleton"
    if env.is_main:
        engine.module.save_skeleton(skeleton, tokenizer)
    cfg = dataclasses.replace(setup.cfg, run_dir=str(run_dir))
    layout = {"layout": {"dp": env.world_size, "tp": 1, "pp": 1}}
    manager = CheckpointManager(
        cfg, env, engine, FixedState(), FixedState({"step": 2}), skeleton, manifest_extra=layout
    )
    manager.maybe_save(2, force=True)
    state = engine.export_state_dict()  # the stage export's gather (collective), as the trainer does
    if env.is_main:
        engine.module.save_pretrained(run_dir / "export", tokenizer, state_dict=state)
    with torch.no_grad():
        logits = unified_logits(engine.module, probe_ids(setup.layout))  # collective under ZeRO-3
    if env.is_main:
        torch.save(logits, run_dir / "logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------------- fixtures

_RUNS: dict[int, Path] = {}


@pytest.fixture(scope="module")
def zero3_run(tiny_base, tmp_path_factory):
    """run(world_size) -> run directory with one ZeRO-3 checkpoint (step 2) and the training logits."""

    def run(world_size: int) -> Path:
        if world_size not in _RUNS:
            run_dir = tmp_path_factory.mktemp(f"zero3_ws{world_size}")
            base = tiny_base.llm_dir.parent
            torchrun(
                world_size, ["-m", "tests.distributed.test_merge_zero3", str(base), str(run_dir)], timeout=600
            )
            _RUNS[world_size] = run_dir
        return _RUNS[world_size]

    yield run
    _RUNS.clear()


def checkpoint_of(run_dir: Path) -> Path:
    return run_dir / STAGE / "checkpoints" / "step_00000002"


def zip_copy(run_dir: Path, dest: Path) -> Path:
    """The same checkpoint with every DeepSpeed rank file re-saved in torch's zip format (the format
    DeepSpeed's own zero_to_fp32 needs: it memory-maps the optimizer files)."""
    from maven_dist.parallel.deepspeed_common import DEEPSPEED_SAFE_GLOBALS

    shutil.copytree(run_dir / STAGE, dest / STAGE)
    for f in (checkpoint_of(dest) / "engine" / "zero").glob("*.pt"):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            state = torch.load(f, map_location="cpu", weights_only=True)
        torch.save(state, f, _use_new_zipfile_serialization=True)
    return dest


def merged_training_state(out: Path, layout) -> dict[str, torch.Tensor]:
    """Training names -> tensors, read back from a merged directory."""
    state = {}
    for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
        for key, t in hf_layout.iter_checkpoint_tensors(out / component):
            state |= hf_layout.from_hf_layout(component, key, t, layout)
    for key, t in load_file(out / hf_layout.MAVEN_MODULES_FILE).items():
        state |= hf_layout.from_hf_layout(hf_layout.MAVEN_MODULES_FILE, key, t, layout)
    return state


# ---------------------------------------------------------------------- bitwise equality


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 3])
def test_the_stage_export_equals_the_merge_of_its_checkpoint_at_every_world_size(
    zero3_run, tmp_path, world_size
):
    """3 ranks do not divide the tiny shapes evenly: ZeRO-3's gathered tensors are then views of padded
    buffers, which the export must save as the plain tensors the merge writes. One rank partitions nothing;
    2 ranks (even partitions) merge in the main-job test (tests/integration/test_pipeline.py)."""
    from tests.unit.test_merge import same_tree

    run_dir = zero3_run(world_size)
    merge_checkpoint(run_dir, tmp_path / "merged", MergeOptions(progress=False))
    same_tree(tmp_path / "merged", run_dir / "export")


@pytest.mark.distributed
# 1 and 3 ranks, the runs the export test makes anyway: 3 gives the uneven partitions, the harder case.
@pytest.mark.parametrize("world_size", [1, 3])
def test_merge_equals_deepspeed_zero_to_fp32_bitwise(zero3_run, tmp_path, world_size):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from maven_dist.contract.vocab import VocabLayout
    from maven_dist.model.maven import MavenModel

    run_dir = zero3_run(world_size)
    zipped = zip_copy(run_dir, tmp_path / "zipped")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_of(zipped) / "engine"), tag="zero")

    merge_checkpoint(run_dir, tmp_path / "from_legacy", MergeOptions(progress=False))
    merge_checkpoint(zipped, tmp_path / "from_zip", MergeOptions(progress=False, max_shard_size="64KB"))
    layout = VocabLayout(**json.loads((tmp_path / "from_legacy" / "config.json").read_text())["vocab"])
    for out in ("from_legacy", "from_zip"):
        merged = merged_training_state(tmp_path / out, layout)
        assert merged.keys() == reference.keys()
        for name, ref in reference.items():
            assert merged[name].dtype == ref.dtype == torch.float32 and torch.equal(merged[name], ref), name

    # And the files are the ones save_pretrained writes for DeepSpeed's state dict (in model order).
    model = MavenModel.from_pretrained(tmp_path / "from_legacy")
    # zero_to_fp32's tensors are views of one flat buffer; at 3 ranks save_pretrained refuses views that
    # do not cover their storage, so the reference files are written from copies (same values).
    ordered = {name: reference[name].clone() for name in model.state_dict()}
    model.save_pretrained(tmp_path / "ref", state_dict=ordered)
    for rel in ("llm/model.safetensors", "vision_tower/model.safetensors", hf_layout.MAVEN_MODULES_FILE):
        assert (tmp_path / "from_legacy" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel
    provenance = json.loads((tmp_path / "from_legacy" / "merge_provenance.json").read_text())
    assert (provenance["kind"], provenance["world_size"], provenance["step"]) == ("zero3", world_size, 2)


@pytest.mark.distributed
def test_merged_model_loads_in_maven_and_plain_transformers_with_training_logits(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maven_dist.model.maven import MavenModel

    run_dir = zero3_run(3)
    out = tmp_path / "merged"
    merge_checkpoint(run_dir, out, MergeOptions(progress=False))
    torch.set_num_threads(1)  # the workers computed with one thread: same reduction order
    training = torch.load(run_dir / "logits.pt", weights_only=True)
    model = MavenModel.from_pretrained(out).eval()
    ids = probe_ids(model.layout)
    with torch.no_grad():
        maven_logits = unified_logits(model, ids)
        llm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
        hf_logits = llm(input_ids=ids).logits
    torch.testing.assert_close(maven_logits, training, rtol=0, atol=1e-6)
    torch.testing.assert_close(hf_logits, training, rtol=0, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    assert len(tokenizer) <= model.layout.padded_size
    assert tokenizer.convert_tokens_to_ids("<img>") == model.layout.img_start_id
    assert llm.config.vocab_size == model.layout.padded_size


# ---------------------------------------------------------------------- errors


@pytest.fixture
def damaged(zero3_run, tmp_path):
    """A private copy of the 3-rank run to damage."""
    shutil.copytree(zero3_run(3) / STAGE, tmp_path / "run" / STAGE)
    return tmp_path / "run"


def zero_dir(run: Path) -> Path:
    return checkpoint_of(run) / "engine" / "zero"


def merge_fails(run: Path, tmp_path: Path, match: str) -> None:
    with pytest.raises(MergeError, match=match):
        merge_checkpoint(run, tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_missing_rank_file_is_named(damaged, tmp_path):
    (zero_dir(damaged) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    merge_fails(
        damaged,
        tmp_path,
        r"lacks 1 rank file\(s\) of a 3-rank checkpoint: \['zero_pp_rank_1_mp_rank_00_optim_states.pt'\]",
    )


@pytest.mark.distributed
def test_mixed_tags_are_refused(damaged, tmp_path):
    shutil.copytree(zero_dir(damaged), zero_dir(damaged).parent / "global_step1")
    merge_fails(damaged, tmp_path, r"mixed tags in .*\['global_step1', 'zero'\]")


@pytest.mark.distributed
def test_rank_files_of_another_save_are_refused(damaged, tmp_path):
    # Rank 1's model states from a later save of the same run: same shapes, another global step.
    from maven_dist.parallel.deepspeed_common import DEEPSPEED_SAFE_GLOBALS

    path = zero_dir(damaged) / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        state = torch.load(path, weights_only=True)
    state["global_steps"] += 5
    torch.save(state, path)
    merge_fails(
        damaged,
        tmp_path,
        r"mixed checkpoints in .*zero_pp_rank_1_mp_rank_00_model_states.pt has global_steps=7",
    )


@pytest.mark.distributed
def test_truncated_rank_file_is_named(damaged, tmp_path):
    path = zero_dir(damaged) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    merge_fails(damaged, tmp_path, r"zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated")


@pytest.mark.distributed
def test_corrupt_rank_file_is_named(damaged, tmp_path):
    path = zero_dir(damaged) / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[40:240] = os.urandom(200)  # inside the pickle
    path.write_bytes(bytes(data))
    merge_fails(
        damaged, tmp_path, r"zero_pp_rank_1_mp_rank_00_model_states.pt is (truncated or corrupt|.*corrupt)"
    )


@pytest.mark.distributed
def test_world_size_that_does_not_match_the_files_is_refused(damaged, tmp_path):
    for kind in ("model", "optim"):
        shutil.copy(
            zero_dir(damaged) / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt",
            zero_dir(damaged) / f"zero_pp_rank_3_mp_rank_00_{kind}_states.pt",
        )
    merge_fails(damaged, tmp_path, r"rank files for ranks \[3\], but the checkpoint was saved by 3 ranks")
    manifest = checkpoint_of(damaged) / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"world_size": 4}))
    merge_fails(
        damaged,
        tmp_path,
        r"partitioned over 3 ranks, but 4 rank files are expected|saved by a run of 3 ranks",
    )


# ---------------------------------------------------------------------- the benchmark runs


@pytest.mark.distributed
def test_bench_runs_at_tiny_size(zero3_run, tmp_path):
    """bench/merge.py end to end on the 3-rank tiny checkpoint (the real bench needs >= 300M parameters);
    its figures checked as every bench's are (tests/unit/test_benches.py)."""
    from bench import merge
    from bench.harness import check_figures
    from maven_dist.merge.output_files import expected_shapes

    ckpt = checkpoint_of(zero3_run(3))
    summary = merge.main(
        ["--checkpoint", str(ckpt), "--work-dir", str(tmp_path), "--rounds", "1", "--min-params", "0"]
    )
    tool = {"wall_s": float, "peak_rss_mb": float}
    check_figures(summary, {"median": {"merge_ckpt": tool, "zero_to_fp32": tool}, "ratio_time": float,
                            "ratio_peak_rss": float, "merge_ckpt_on_legacy_files": tool, "bitwise_equal": bool})  # fmt: skip
    assert summary["bitwise_equal"] and summary["tensors_compared"] == len(expected_shapes(ckpt / "model"))
    assert summary["ratio_time"] > 0 and summary["ratio_peak_rss"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["parameters"] == summary["parameters"]


@pytest.mark.distributed
def test_universal_checkpoint_merges_to_the_same_files(damaged, tmp_path):
    """engine/universal (what a resume on another number of ranks converts to) merges like engine/zero;
    where both exist the original ZeRO files are read."""
    from maven_dist.parallel.zero3 import maybe_convert_to_universal

    engine = checkpoint_of(damaged) / "engine"
    maybe_convert_to_universal(engine)
    both = merge_checkpoint(damaged, tmp_path / "both", MergeOptions(progress=False))
    shutil.rmtree(engine / "zero")
    only = merge_checkpoint(damaged, tmp_path / "universal", MergeOptions(progress=False))
    assert (both.kind, only.kind) == ("zero3", "zero3-universal")
    for rel in ("llm/model.safetensors", "vision_tower/model.safetensors", hf_layout.MAVEN_MODULES_FILE):
        assert (tmp_path / "both" / rel).read_bytes() == (tmp_path / "universal" / rel).read_bytes(), rel
    next((engine / "universal" / "zero").glob("llm.*/fp32.pt")).unlink()
    merge_fails(damaged, tmp_path, r"fp32.pt is missing")
