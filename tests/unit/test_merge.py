"""merge_ckpt without training: the streaming writer against safetensors itself, tensor locations in
zip-format torch.save files (the legacy format is refused), and whole merges of a single-process
checkpoint against save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maven_dist.merge import PROVENANCE_FILE, MergeError, MergeOptions, merge_checkpoint
from maven_dist.merge.output_files import OutFile, OutTensor
from maven_dist.merge.source import Piece, SourceTensor, find_checkpoint
from maven_dist.merge.torch_files import TorchFileIndex
from maven_dist.merge.writer import ChunkReader, write_file
from maven_dist.model import hf_layout

# ---------------------------------------------------------------------- writer


def _raw_source(path: Path, name: str, t: torch.Tensor, pieces: int = 1) -> SourceTensor:
    """`t` written raw to `path`, described as `pieces` byte ranges."""
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    with open(path, "ab") as f:
        start = f.tell()
        f.write(data)
    cuts = [
        start + round(i * len(data) / pieces / t.element_size()) * t.element_size() for i in range(pieces + 1)
    ]
    return SourceTensor(
        name,
        tuple(t.shape),
        t.dtype,
        tuple(Piece(path, a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a),
        True,
    )


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_file_is_byte_identical_to_safetensors(tmp_path, metadata):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.idx": torch.arange(6, dtype=torch.int64).view(2, 3),
        "z": torch.randn(4, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
    }
    raw = tmp_path / "raw.bin"
    out = OutFile(
        "x.safetensors",
        [
            OutTensor(k, tuple(v.shape), v.dtype, (_raw_source(raw, k, v, pieces=3),))
            for k, v in tensors.items()
        ],
        metadata,
    )
    reader = ChunkReader(threads=3, chunk_bytes=16, read_ahead=4)  # tiny chunks: many reads per tensor
    try:
        digest = write_file(tmp_path / "ours.safetensors", out, reader, lambda n: None)
    finally:
        reader.close()
    save_file(tensors, tmp_path / "theirs.safetensors", metadata=metadata)
    ours, theirs = (
        (tmp_path / "ours.safetensors").read_bytes(),
        (tmp_path / "theirs.safetensors").read_bytes(),
    )
    assert ours == theirs
    import hashlib

    assert digest == hashlib.sha256(theirs).hexdigest()


def test_streamed_cast_and_concatenation_match_torch(tmp_path):
    g = torch.Generator().manual_seed(1)
    text, new = torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g)
    raw = tmp_path / "raw.bin"
    sources = (_raw_source(raw, "text", text, pieces=2), _raw_source(raw, "new", new))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = OutFile("x.safetensors", [OutTensor("w", (7, 3), dtype, sources)], None)
        reader = ChunkReader(threads=2, chunk_bytes=8, read_ahead=2)
        try:
            write_file(tmp_path / "x.safetensors", out, reader, lambda n: None)
        finally:
            reader.close()
        got = load_file(tmp_path / "x.safetensors")["w"]
        assert got.dtype == dtype and torch.equal(got, torch.cat([text, new]).to(dtype))


# ---------------------------------------------------------------------- torch.save files


def test_torch_file_index_locates_every_tensor(tmp_path):
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(40, generator=g)
    obj = {
        "groups": [flat, torch.randn(9, generator=g).to(torch.bfloat16)],
        "view": flat[10:30],  # shares flat's storage
        "nested": {"ids": torch.arange(5), "half": torch.randn(2, 3, generator=g).half()},
        "empty": torch.zeros(0, 4),
        "scalar": 3,
    }
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    index = TorchFileIndex(path)
    expect = [obj["groups"][0], obj["groups"][1], obj["view"], obj["nested"]["ids"], obj["nested"]["half"]]
    found = [
        index.obj["groups"][0],
        index.obj["groups"][1],
        index.obj["view"],
        index.obj["nested"]["ids"],
        index.obj["nested"]["half"],
    ]
    assert index.obj["scalar"] == 3
    data = path.read_bytes()
    for want, mapped in zip(expect, found, strict=True):
        loc = index.locate(mapped)
        got = torch.frombuffer(bytearray(data[loc.offset : loc.offset + loc.nbytes]), dtype=loc.dtype).view(
            loc.shape
        )
        assert torch.equal(got, want)
    assert index.locate(index.obj["empty"]).nbytes == 0
    with pytest.raises(MergeError, match="does not belong to this file"):
        index.locate(flat)
    with pytest.raises(MergeError, match="does not belong to this file"):
        index.locate(TorchFileIndex(path).obj["groups"][0])  # the same bytes, but another file's mapping


def _rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_torch_file_index_reads_no_tensor_data(tmp_path):
    """The file is memory-mapped, not read: indexing a 256 MB file leaves RSS where it was."""
    path = tmp_path / "big.pt"
    torch.save({"w": torch.ones(64 << 20), "b": torch.ones(3)}, path)
    before = _rss_bytes()
    index = TorchFileIndex(path)
    loc = index.locate(index.obj["w"])
    assert _rss_bytes() - before < 32 << 20
    assert loc.nbytes == 256 << 20 and loc.offset + loc.nbytes <= path.stat().st_size


def test_torch_file_index_refuses_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeError, match=r"state\.pt is truncated"):
        TorchFileIndex(path)
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    with pytest.raises(MergeError, match=r"state\.pt is (truncated or corrupt|.*corrupt)"):
        TorchFileIndex(path)
    damaged = bytearray(data)
    damaged[100:140] = bytes(40)  # inside the pickle
    path.write_bytes(bytes(damaged))
    with pytest.raises(MergeError, match=r"state\.pt is truncated or corrupt"):
        TorchFileIndex(path)


def test_torch_file_index_refuses_the_legacy_format(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.randn(10)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        MergeError, match=r"old\.pt is in torch's legacy \(non-zip\) torch.save format.*not read"
    ):
        TorchFileIndex(path)


def test_torch_file_index_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": shutil.rmtree}, path)
    with pytest.raises(MergeError, match="truncated or corrupt"):
        TorchFileIndex(path)


# ---------------------------------------------------------------------- whole merges (single-process kind)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny MaVEn built from random base models, with its extended tokenizer."""
    from transformers import AutoTokenizer

    from maven_dist.contract.vocab import extend_tokenizer
    from maven_dist.model.maven import MavenModel
    from maven_dist.model.spec import MavenSpec
    from tests.conftest import build_tiny_base

    base = build_tiny_base(tmp_path_factory.mktemp("merge_base"))
    tokenizer = AutoTokenizer.from_pretrained(base.llm_dir)
    layout = extend_tokenizer(tokenizer, 64, 128)
    model = MavenModel.from_base(
        base.llm_dir, base.tower_dir, layout, MavenSpec(selector_hidden_size=16, num_codes=8), seed=3
    )
    return model, tokenizer


def write_local_checkpoint(
    run: Path, model, tokenizer, step: int = 3, trainable=("projector", "vocab_new_rows")
) -> Path:
    """The layout Checkpointer + LocalEngine write: manifest, HF skeleton, engine/model.safetensors."""
    stage = run / "stage4"
    ckpt = stage / "checkpoints" / f"step_{step:08d}"
    (ckpt / "engine").mkdir(parents=True)
    model.save_skeleton(ckpt / "model", tokenizer)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "engine" / "model.safetensors"
    )
    manifest = {
        "step": step,
        "world_size": 1,
        "fingerprint": "f00d",
        "stage": "stage4",
        "layout": {"dp": 1, "tp": 1, "pp": 1},
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (stage / "checkpoints" / "latest").write_text(ckpt.name)
    (stage / "resolved_recipe.yaml").write_text(f"stage:\n  name: stage4\n  trainable: {list(trainable)}\n")
    return ckpt


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(
        p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name != PROVENANCE_FILE
    )
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_local_merge_is_byte_identical_to_save_pretrained(tmp_path, local_model, max_shard_size):
    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer)
    result = merge_checkpoint(
        tmp_path / "run", tmp_path / "merged", MergeOptions(max_shard_size=max_shard_size, progress=False)
    )
    model.save_pretrained(tmp_path / "ref", tokenizer, max_shard_size=max_shard_size)
    same_tree(tmp_path / "merged", tmp_path / "ref")
    assert (max_shard_size == "20KB") == (
        tmp_path / "merged" / "llm" / "model.safetensors.index.json"
    ).is_file()
    provenance = json.loads((tmp_path / "merged" / PROVENANCE_FILE).read_text())
    assert (
        provenance["kind"] == "local"
        and provenance["step"] == 3
        and provenance["recipe_fingerprint"] == "f00d"
    )
    assert provenance["complete"] and set(provenance["sha256"]) == {
        p.relative_to(tmp_path / "merged").as_posix()
        for p in (tmp_path / "merged").rglob("*")
        if p.name != PROVENANCE_FILE and p.is_file()
    }
    assert result.num_parameters == len(model.state_dict())


def test_bf16_merge_equals_save_pretrained_of_bf16_weights(tmp_path, local_model):
    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer)
    merge_checkpoint(tmp_path / "run", tmp_path / "merged", MergeOptions(dtype="bf16", progress=False))
    model.save_pretrained(
        tmp_path / "ref",
        tokenizer,
        state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
    )
    same_tree(tmp_path / "merged", tmp_path / "ref")


def test_only_and_exclude_frozen_select_parts(tmp_path, local_model):
    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer, trainable=("projector", "vocab_new_rows"))
    merge_checkpoint(tmp_path / "run", tmp_path / "proj", MergeOptions(only=("projector",), progress=False))
    assert not (tmp_path / "proj" / "llm" / "model.safetensors").exists()
    modules = load_file(tmp_path / "proj" / hf_layout.MAVEN_MODULES_FILE)
    state = model.state_dict()
    assert modules.keys() == {k for k in state if k.startswith("projector.")}
    assert all(torch.equal(modules[k], state[k]) for k in modules)
    assert not json.loads((tmp_path / "proj" / PROVENANCE_FILE).read_text())["complete"]

    # Trained: projector and the new vocab rows; the rows are written joined to the (frozen) text rows.
    merge_checkpoint(
        tmp_path / "run", tmp_path / "trained", MergeOptions(exclude_frozen=True, progress=False)
    )
    llm = load_file(tmp_path / "trained" / "llm" / "model.safetensors")
    assert llm.keys() == {"model.embed_tokens.weight", "lm_head.weight"}
    assert torch.equal(
        llm["lm_head.weight"], torch.cat([state["llm.lm_head.weight"], state["vocab_new_rows.head.weight"]])
    )
    assert not (tmp_path / "trained" / "vision_tower" / "model.safetensors").exists()
    assert load_file(tmp_path / "trained" / hf_layout.MAVEN_MODULES_FILE).keys() == {
        k for k in state if k.startswith("projector.")
    }
    with pytest.raises(MergeError, match="unknown part"):
        merge_checkpoint(tmp_path / "run", tmp_path / "bad", MergeOptions(only=("decoder",), progress=False))


def test_refuses_to_overwrite_without_force_and_replaces_with_it(tmp_path, local_model):
    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists; pass --force"):
        merge_checkpoint(tmp_path / "run", out, MergeOptions(progress=False))
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoint(tmp_path / "run", out, MergeOptions(force=True, progress=False))
    assert not (out / "keep.txt").exists() and (out / "llm" / "model.safetensors").is_file()
    assert not (tmp_path / "merged.merging").exists()


def test_finds_checkpoints_by_run_stage_step_and_tag_and_refuses_incomplete_ones(tmp_path, local_model):
    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer, step=3)
    newest = write_local_checkpoint(tmp_path / "run2", model, tokenizer, step=5)
    shutil.copytree(newest, tmp_path / "run" / "stage4" / "checkpoints" / newest.name)
    (tmp_path / "run" / "stage4" / "checkpoints" / "latest").write_text(newest.name)
    ckpts = tmp_path / "run" / "stage4" / "checkpoints"
    assert find_checkpoint(tmp_path / "run").step == 5
    assert find_checkpoint(tmp_path / "run" / "stage4", step=3).step == 3
    assert find_checkpoint(ckpts, tag="step_00000003").step == 3
    assert find_checkpoint(ckpts / "step_00000005").step == 5
    with pytest.raises(
        MergeError, match=r"no checkpoint step_00000004; available: \['step_00000003', 'step_00000005'\]"
    ):
        find_checkpoint(tmp_path / "run", step=4)
    partial = ckpts / "step_00000007.tmp"
    (partial / "engine").mkdir(parents=True)
    with pytest.raises(MergeError, match="incomplete save"):
        find_checkpoint(tmp_path / "run", step=7)
    with pytest.raises(MergeError, match="incomplete save"):
        find_checkpoint(partial)


def test_missing_parameter_and_wrong_shape_are_refused(tmp_path, local_model):
    model, tokenizer = local_model
    ckpt = write_local_checkpoint(tmp_path / "run", model, tokenizer)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dropped = dict(state)
    dropped.pop(next(k for k in state if k.startswith("selector.")))
    save_file(dropped, ckpt / "engine" / "model.safetensors")
    with pytest.raises(MergeError, match="lacks 1 expected parameters"):
        merge_checkpoint(tmp_path / "run", tmp_path / "out", MergeOptions(progress=False))
    name = next(k for k in state if k.startswith("projector."))
    save_file(state | {name: torch.zeros(3, 3)}, ckpt / "engine" / "model.safetensors")
    with pytest.raises(MergeError, match=rf"{name} has shape \(3, 3\)"):
        merge_checkpoint(tmp_path / "run", tmp_path / "out", MergeOptions(progress=False))
    data = (ckpt / "engine" / "model.safetensors").read_bytes()
    (ckpt / "engine" / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(MergeError, match="model.safetensors is truncated"):
        merge_checkpoint(tmp_path / "run", tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_file_truncated_during_the_merge_fails_cleanly(tmp_path, local_model, monkeypatch):
    """A rank file that shrinks after planning (a copy still in progress): the short read is named and
    no output or temporary directory is left."""
    from maven_dist.merge import merge as merge_module

    model, tokenizer = local_model
    ckpt = write_local_checkpoint(tmp_path / "run", model, tokenizer)
    weights = ckpt / "engine" / "model.safetensors"
    original = merge_module._write_weights

    def truncate_then_write(tmp, layout, options):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return original(tmp, layout, options)

    monkeypatch.setattr(merge_module, "_write_weights", truncate_then_write)
    with pytest.raises(MergeError, match=r"model.safetensors is truncated: \d+ bytes wanted at offset"):
        merge_checkpoint(tmp_path / "run", tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.merging").exists()


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["merge_ckpt.py", str(tmp_path / "nowhere"), str(tmp_path / "out")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path("tools/merge_ckpt.py", run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_run_directory_picks_the_newest_stage_unless_told(tmp_path, local_model):
    import os

    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer, step=4)
    stage3 = tmp_path / "run" / "stage3" / "checkpoints"
    shutil.copytree(tmp_path / "run" / "stage4" / "checkpoints", stage3)
    old = (tmp_path / "run" / "stage4" / "checkpoints" / "latest").stat().st_mtime - 100
    os.utime(stage3 / "latest", (old, old))
    assert find_checkpoint(tmp_path / "run").path.parents[1].name == "stage4"
    assert find_checkpoint(tmp_path / "run", stage="stage3").path.parents[1].name == "stage3"
    with pytest.raises(
        MergeError, match=r"no stage 'stage9' with checkpoints; it has \['stage3', 'stage4'\]"
    ):
        find_checkpoint(tmp_path / "run", stage="stage9")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, local_model, capsys):
    from maven_dist.cli.merge import main as merge_main

    model, tokenizer = local_model
    write_local_checkpoint(tmp_path / "run", model, tokenizer)
    assert merge_main([str(tmp_path / "run"), str(tmp_path / "merged"), "--max-shard-size", "20KB"]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("[merge] ")]
    written = [line for line in lines if " wrote " in line]
    assert written and "(100%)" in lines[-1], out.out
    assert len(written) == len({line.split(" wrote ")[1] for line in written}), "each file reported once"
    assert "\r" not in out.out + out.err, "no progress bar in a log file"
