"""tools/prepare_data.py: one malformed record per rule -> rejected with its reason and id; resume; determinism."""

from __future__ import annotations

import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maven_dist.data.prepare import REASONS, PrepareError, PrepareOptions, prepare
from maven_dist.data.shards import list_shards, read_shard
from maven_dist.offline.synthetic import generate_synthetic
from maven_dist.offline.tokenizer_training import train_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _turns(question: str, answer: str = "A shape.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Synthetic images + a JSONL with good records and exactly one bad record per rule."""
    root = tmp_path_factory.mktemp("corpus")
    synth = generate_synthetic(root / "synth", num_images=6, seed=0, image_size=48)
    tok_dir = root / "tok"
    train_tokenizer(synth.captions_txt.read_text().splitlines(), tok_dir, vocab_size=400)
    images = synth.image_root
    png = (images / "00000.png").read_bytes()
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("not an image")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    rgb = Image.open(images / "00001.png")
    rgb.convert("L").save(images / "gray.png")
    rgb.convert("P").save(images / "palette.png")
    rgb.convert("RGBA").save(images / "alpha.png")

    good = [
        {"id": "good-1", "image": "00000.png", "conversations": _turns("<image>\nWhat is this?")},
        {
            "id": "good-2",
            "image": ["00001.png", "00002.png"],
            "conversations": _turns("<image>\n<image>\nCompare."),
        },
        {"id": "good-text", "conversations": _turns("No image here?", "Right.")},
        {"id": "good-gray", "image": "gray.png", "conversations": _turns("<image>\nGray?")},
        {"id": "good-palette", "image": "palette.png", "conversations": _turns("<image>\nPalette?")},
        {"id": "good-alpha", "image": "alpha.png", "conversations": _turns("<image>\nAlpha?")},
        {"id": 7, "image": "00003.png", "conversations": _turns("<image>\nInteger id?")},
    ]
    bad = {
        "not_an_object": [1, 2, 3],
        "missing_id": {"image": "00000.png", "conversations": _turns("<image>\nx")},
        "duplicate_id": {"id": "good-1", "image": "00000.png", "conversations": _turns("<image>\nAgain?")},
        "empty_conversation": {"id": "bad-empty", "image": "00000.png", "conversations": []},
        "non_alternating": {
            "id": "bad-alt",
            "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        },
        "unknown_role": {
            "id": "bad-role",
            "conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}],
        },
        "non_string_value": {
            "id": "bad-value",
            "conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "b"}],
        },
        "bad_image_field": {
            "id": "bad-field",
            "image": {"path": "00000.png"},
            "conversations": _turns("<image>\nx"),
        },
        "image_count_mismatch": {
            "id": "bad-count",
            "image": "00000.png",
            "conversations": _turns("<image>\n<image>\nx"),
        },
        "missing_image": {"id": "bad-missing", "image": "nope.png", "conversations": _turns("<image>\nx")},
        "empty_image": {"id": "bad-zero", "image": "empty.png", "conversations": _turns("<image>\nx")},
        "unreadable_image": {
            "id": "bad-unreadable",
            "image": "text.png",
            "conversations": _turns("<image>\nx"),
        },
        "truncated_image": {
            "id": "bad-truncated",
            "image": "truncated.png",
            "conversations": _turns("<image>\nx"),
        },
        "too_long": {
            "id": "bad-long",
            "image": "00004.png",
            "conversations": _turns("<image>\n" + "word " * 200),
        },
    }
    lines = [json.dumps(r) for r in good[:3]] + ["{this is not json"]
    lines += [json.dumps(r) for r in bad.values()] + [""] + [json.dumps(r) for r in good[3:]]
    source = root / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return {"root": root, "synth": synth, "tok": tok_dir, "source": source, "good": good, "bad": bad}


def _options(corpus, out: Path, **kw) -> PrepareOptions:
    base = dict(
        image_root=corpus["synth"].image_root,
        out_dir=out,
        tokenizer_dir=corpus["tok"],
        max_length=256,
        num_codes=8,
        num_patches=16,
        keep_ratio=0.25,
        shard_size=4,
        num_workers=0,
        progress=False,
    )
    base.update(kw)
    return PrepareOptions(**base)


def _rows(out: Path) -> list[dict]:
    return [row for shard in list_shards(out) for row in read_shard(shard).to_pylist()]


def test_every_rule_rejects_with_its_reason_and_id(corpus, tmp_path):
    manifest = prepare([corpus["source"]], _options(corpus, tmp_path / "out"))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"]: r for r in rejects}
    assert sorted(by_reason) == sorted(REASONS)
    assert len(rejects) == len(REASONS)  # exactly one per rule: no good record was caught
    for reason, record in corpus["bad"].items():
        expected_id = record.get("id") if isinstance(record, dict) else None
        assert by_reason[reason]["id"] == expected_id, reason
        assert by_reason[reason]["source"] == "mixed.jsonl"
        assert by_reason[reason]["message"]
    # Lines are 1-based and point at the bad line itself.
    lines = corpus["source"].read_text().splitlines()
    for r in rejects:
        assert r["line"] == r["index"] + 1
        if r["reason"] != "malformed_json":
            assert json.loads(lines[r["index"]]) is not None
    assert by_reason["malformed_json"]["line"] == 4
    assert (
        "good-1" in by_reason["duplicate_id"]["message"] or "line 1" in by_reason["duplicate_id"]["message"]
    )

    rows = _rows(tmp_path / "out")
    assert [r["id"] for r in rows] == [str(g["id"]) for g in corpus["good"]]
    counts = manifest["counts"]
    assert counts["records"] == len(corpus["good"]) + len(REASONS)
    assert counts["kept"] == len(rows) == len(corpus["good"])
    assert counts["rejected"] == len(rejects)
    assert counts["rejected_by_reason"] == {r: 1 for r in REASONS}
    assert counts["converted_modes"] == {"L": 1, "P": 1, "RGBA": 1}
    assert counts["images"] == sum(len(r["images"]) for r in rows) == 7
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["counts"] == counts and on_disk["sources"][0]["records"] == counts["records"]

    by_id = {r["id"]: r for r in rows}
    # Converted images are stored as RGB whose pixels equal PIL's conversion of the original.
    stored = Image.open(io.BytesIO(by_id["good-gray"]["images"][0]))
    assert stored.mode == "RGB"
    expected = Image.open(corpus["synth"].image_root / "gray.png").convert("RGB")
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(expected))
    # RGB PNGs are stored byte for byte; sizes and paths are the originals'.
    assert by_id["good-1"]["images"][0] == (corpus["synth"].image_root / "00000.png").read_bytes()
    assert by_id["good-2"]["image_paths"] == ["00001.png", "00002.png"]
    assert by_id["good-2"]["image_sizes"] == [[48, 36], [36, 48]]
    assert by_id["good-text"]["images"] == []


def test_strict_stops_at_the_first_bad_record(corpus, tmp_path):
    with pytest.raises(PrepareError, match=r"mixed.jsonl line 4 .*malformed_json"):
        prepare([corpus["source"]], _options(corpus, tmp_path / "out", strict=True))
    # A corpus whose only problem is an image fails in the worker phase, with that record's id.
    only_image = tmp_path / "img.json"
    only_image.write_text(json.dumps([corpus["good"][0], corpus["bad"]["truncated_image"]]))
    with pytest.raises(PrepareError, match=r"id 'bad-truncated'.*truncated_image"):
        prepare([only_image], _options(corpus, tmp_path / "out2", strict=True))


def test_resume_skips_finished_shards_and_output_is_deterministic(corpus, tmp_path):
    synth = corpus["synth"]
    sources = [synth.captions_json, synth.conversations_json]
    first = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024))
    shards = list_shards(tmp_path / "a")
    assert len(shards) == 4 and first["resumed_shards"] == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    again = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024))
    assert again["resumed_shards"] == 4
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in list_shards(tmp_path / "a")} == before
    # An interrupted run: one shard missing -> only it is rebuilt, identical to before.
    shards[2].unlink()
    resumed = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024))
    assert resumed["resumed_shards"] == 3
    assert shards[2].read_bytes() == before[shards[2].name][1]
    assert resumed["counts"] == first["counts"]
    # Changing an option that changes contents rebuilds everything.
    changed = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024, resize=32))
    assert changed["resumed_shards"] == 0
    # Two worker processes write byte-identical shards and the same manifest counts.
    parallel = prepare(sources, _options(corpus, tmp_path / "b", max_length=1024, num_workers=2))
    assert {p.name: p.read_bytes() for p in list_shards(tmp_path / "b")} == {
        k: v[1] for k, v in before.items()
    }
    assert parallel["counts"] == first["counts"] and parallel["shards"] == first["shards"]


def test_cli(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    argv = [
        "prepare_data.py", str(corpus["synth"].captions_json), "--image-root", str(corpus["synth"].image_root),
        "--out", str(out), "--tokenizer", str(corpus["tok"]), "--template", "plain", "--max-length", "512",
        "--num-codes", "8", "--num-patches", "16", "--resize", "32", "--keep-original", "--workers", "0",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / "tools" / "prepare_data.py"), run_name="__main__")
    assert code.value.code == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 6
    rows = _rows(out)
    assert all(Image.open(io.BytesIO(r["images"][0])).size == (32, 32) for r in rows)
    assert rows[0]["original_images"][0] == (corpus["synth"].image_root / "00000.png").read_bytes()
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "--strict", "--workers", "0", "--max-length", "20"])
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / "tools" / "prepare_data.py"), run_name="__main__")
    assert code.value.code == 2  # an input error, like every maven command's
    assert "too_long" in capsys.readouterr().err


def test_plain_template_measures_the_first_round(corpus, tmp_path):
    """Stages 2-3 render only the first round: its images must all be there, later rounds are ignored."""
    records = [
        {
            "id": "late-image",
            "image": "00000.png",
            "conversations": _turns("Hi?", "Hello.") + _turns("<image>\nAnd?"),
        },
        {
            "id": "multi-round",
            "image": "00000.png",
            "conversations": _turns("<image>\nWhat?") + _turns("More?"),
        },
    ]
    source = tmp_path / "rounds.json"
    source.write_text(json.dumps(records))
    manifest = prepare([source], _options(corpus, tmp_path / "out", template="plain"))
    assert manifest["counts"]["rejected_by_reason"] == {"image_count_mismatch": 1}
    assert [r["id"] for r in _rows(tmp_path / "out")] == ["multi-round"]
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["id"] == "late-image" and "first round" in reject["message"]
