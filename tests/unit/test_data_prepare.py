"""tools/prepare_data.py: one malformed record per rule -> rejected with its reason and id; resume; determinism."""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maven_dist.data.images import RecordRejected, load_image
from maven_dist.data.prepare import PrepareOptions, prepare
from maven_dist.data.records import REASONS, PrepareError
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
    (synth.root / "outside.png").write_bytes(png)  # beside the image root, not in it
    Image.new("RGB", (1, 9000), (9, 9, 9)).save(images / "thin.png")  # letterboxed: 9000 x 9000
    Image.fromarray(np.zeros((8, 8), np.float32)).save(images / "float.tif")

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
        "empty_answer": {
            "id": "bad-answer",
            "image": "00000.png",
            "conversations": _turns("<image>\nx", "  "),
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
        "invalid_utf8": {"id": "bad-utf8", "conversations": _turns("caf\udce9?")},
        "control_character": {"id": "bad-control", "conversations": _turns("nul\x00here")},
        "bad_turn": {"id": "bad-turn", "conversations": ["hi", "there"]},
        "oversized_conversation": {"id": "bad-huge", "conversations": _turns("a", "b") * 600},
        "special_token": {"id": "bad-special", "conversations": _turns("Hi?", "Done.</s>")},
        "image_outside_root": {
            "id": "bad-escape",
            "image": "../outside.png",
            "conversations": _turns("<image>\nx"),
        },
        "image_too_large": {"id": "bad-thin", "image": "thin.png", "conversations": _turns("<image>\nx")},
        "unsupported_mode": {"id": "bad-float", "image": "float.tif", "conversations": _turns("<image>\nx")},
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
    assert len(shards) == 5 and first["resumed_shards"] == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    again = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024))
    assert again["resumed_shards"] == 5
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in list_shards(tmp_path / "a")} == before
    # An interrupted run: one shard missing -> only it is rebuilt, identical to before.
    shards[2].unlink()
    resumed = prepare(sources, _options(corpus, tmp_path / "a", max_length=1024))
    assert resumed["resumed_shards"] == 4
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


# ---------------------------------------------------------------------------------------------
# Attacks: what a downloaded data set can hold. Each bad input sits between good records of the same
# file; it must be rejected with its reason, and every good record kept.
# ---------------------------------------------------------------------------------------------

KEEP = [
    {"id": 7, "image": "00000.png", "conversations": _turns("<image>\nWhat is this?")},
    {"id": "keep-text", "conversations": _turns("No image here?", "Right.")},
    {
        "id": "keep-2",
        "image": ["00001.png", "00002.png"],
        "conversations": _turns("<image>\n<image>\nCompare."),
    },
]
KEPT = [str(r["id"]) for r in KEEP]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width` x `height` (and no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def attack(corpus):
    """Hostile files in (and around) the corpus' image root."""
    images = corpus["synth"].image_root
    outside = corpus["root"] / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(secret)
    (images / "link-out.png").symlink_to(secret)
    (images / "dir-out").symlink_to(outside, target_is_directory=True)
    (images / "dangling-out.png").symlink_to(outside / "nothing-here.png")
    (images / "loop-a.png").symlink_to(images / "loop-b.png")
    (images / "loop-b.png").symlink_to(images / "loop-a.png")
    (images / "a-dir.png").mkdir()
    os.mkfifo(images / "fifo.png")
    (images / "zero-width.png").write_bytes(_png_header(0, 10))
    (images / "bomb.png").write_bytes(_png_header(30000, 30000))  # 900 MP declared, 60 bytes on disk
    (images / "padded.png").write_bytes((images / "00000.png").read_bytes() + bytes(300_000))
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8)).save(images / "int32.tif")
    (images / "ghost.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    return {"images": images, "secret": secret}


def _source(tmp_path: Path, bad: list[bytes], suffix: str) -> Path:
    """KEEP[0], KEEP[1], the bad items, KEEP[2]: one JSONL line or JSON list item each."""
    good = [json.dumps(r).encode() for r in KEEP]
    items = [*good[:2], *bad, good[2]]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"attack{suffix}"
    path.write_bytes(b"\n".join(items) + b"\n" if suffix == ".jsonl" else b"[" + b",\n".join(items) + b"]")
    return path


def _run(corpus, tmp_path, bad: list[bytes], suffix: str = ".jsonl", **kw) -> tuple[list[str], list[dict]]:
    out = tmp_path / "out"
    prepare([_source(tmp_path, bad, suffix)], _options(corpus, out, **kw))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return [r["id"] for r in _rows(out)], rejects


def _image(path: str, question: str = "<image>\nWhat?") -> dict:
    return {"id": "bad", "image": path, "conversations": _turns(question)}


def _text(question: str, answer: str = "A shape.") -> dict:
    return {"id": "bad", "conversations": _turns(question, answer)}


# (bad record or raw line, reason, a fragment of the message); a callable gets the attack fixture.
ATTACKS = {
    # Path escapes.
    "dotdot": (_image("../../elsewhere/secret.png"), "image_outside_root", "'..' leads out"),
    "absolute": (lambda a: _image(str(a["secret"])), "image_outside_root", "an absolute path"),
    "absolute_system": (_image("/etc/passwd"), "image_outside_root", "an absolute path"),
    "symlink_file": (_image("link-out.png"), "image_outside_root", "a symlink leads out"),
    "symlink_dir": (_image("dir-out/secret.png"), "image_outside_root", "a symlink leads out"),
    "symlink_dangling": (_image("dangling-out.png"), "image_outside_root", "a symlink leads out"),
    # Paths that stay inside but are not image files.
    "symlink_loop": (_image("loop-a.png"), "unreadable_image", "cannot be opened"),
    "directory": (_image("a-dir.png"), "unreadable_image", "is a directory"),
    "fifo": (_image("fifo.png"), "unreadable_image", "not a regular file"),
    "nul_in_path": (_image("00000.png\x00.jpg"), "control_character", "image path 0"),
    "empty_path": (_image(""), "bad_image_field", "image path 0 is empty"),
    # Image contents.
    "zero_width": (_image("zero-width.png"), "unreadable_image", "zero-width.png"),
    "decompression_bomb": (_image("bomb.png"), "image_too_large", "bomb.png"),
    "extreme_aspect": (_image("thin.png"), "image_too_large", "1 x 9000 pixels; max_image_side is 8192"),
    "int32_mode": (_image("int32.tif"), "unsupported_mode", "mode I"),
    "float_mode": (_image("float.tif"), "unsupported_mode", "mode F"),
    "eps_ghostscript": (_image("ghost.eps"), "unreadable_image", "not an image in an accepted format"),
    "many_images": (
        _image([f"never-opened-{k}.png" for k in range(500)], "<image>" * 500),
        "too_long",
        "tokens after image expansion",
    ),
    # Text.
    "nul_in_text": (_text("one\x00two"), "control_character", "U+0000"),
    "bell_in_answer": (
        _text("Ring?", "ding\x07"),
        "control_character",
        "turn 1 value has control character U+0007",
    ),
    "c1_control": (_text("mojibake \x85"), "control_character", "U+0085"),
    "control_in_id": ({"id": "a\x1bb", "conversations": _turns("x")}, "control_character", "id has"),
    "lone_surrogate": (_text("emoji \ud83d?"), "invalid_utf8", "unpaired surrogate \\ud83d"),
    "latin1_bytes": (
        b'{"id": "bad", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "b"}]}',
        "invalid_utf8",
        "byte 0xe9",
    ),
    "latin1_outside_string": (b'{"id": "bad", \xff}', "invalid_utf8", "line is not valid UTF-8"),
    "eos_in_answer": (_text("Hi?", "Yes.</s>USER: more"), "special_token", "'</s>'"),
    "bos_in_question": (_text("<s>strike</s>"), "special_token", "'<s>'"),
    "visual_code": (_text("Hi?", "It is <img_00042>."), "special_token", "'<img_00042>'"),
    "image_start": (_text("Hi?", "<img> here"), "special_token", "'<img>'"),
    "too_many_turns": (
        {"id": "bad", "conversations": _turns("a", "b") * 513},
        "oversized_conversation",
        "1026 turns > max_turns 1024",
    ),
    "huge_text": (_text("a" * 300_000), "oversized_conversation", "max_text_chars 262144"),
    # JSON shapes and types at every level.
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, "malformed_json", "recursion"),
    "huge_integer": (b'{"id": ' + b"9" * 5000 + b', "conversations": []}', "malformed_json", "digits"),
    "record_string": ("just text", "not_an_object", "record is str"),
    "record_null": (None, "not_an_object", "record is NoneType"),
    "id_null": ({"id": None, "conversations": _turns("x")}, "missing_id", "None"),
    "id_float": ({"id": 1.5, "conversations": _turns("x")}, "missing_id", "1.5"),
    "id_bool": ({"id": True, "conversations": _turns("x")}, "missing_id", "True"),
    "id_object": ({"id": {"a": 1}, "conversations": _turns("x")}, "missing_id", "{'a': 1}"),
    "id_str_duplicates_int": ({"id": "7", "conversations": _turns("x")}, "duplicate_id", "first seen"),
    "conversations_object": (
        {"id": "bad", "conversations": {"from": "human"}},
        "empty_conversation",
        "not a list",
    ),
    "conversations_string": ({"id": "bad", "conversations": "hello"}, "empty_conversation", "not a list"),
    "turn_string": ({"id": "bad", "conversations": ["q", "a"]}, "bad_turn", "turn 0 is str"),
    "turn_null": (
        {"id": "bad", "conversations": [_turns("q")[0], None]},
        "bad_turn",
        "turn 1 is NoneType",
    ),
    "role_list": (
        {"id": "bad", "conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]},
        "unknown_role",
        "['human']",
    ),
    "value_number": (
        {"id": "bad", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
        "non_string_value",
        "int",
    ),
    "value_missing": (
        {"id": "bad", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        "non_string_value",
        "NoneType",
    ),
    "image_number": (_image(5), "bad_image_field", "'image' is 5"),
    "image_object": (_image({"path": "00000.png"}), "bad_image_field", "{'path'"),
    "image_list_mixed": (_image(["00000.png", None], "<image><image>"), "bad_image_field", "None"),
}


JSONL_ONLY = {"deep_nesting", "huge_integer", "latin1_outside_string"}
"""Unparseable JSON: in a .json file it is a whole-file error (test_bad_source_files_...)."""


def _attack_line(name: str, attack: dict, unique_id: bool = False) -> bytes:
    bad = ATTACKS[name][0]
    bad = bad(attack) if callable(bad) else bad
    if isinstance(bad, bytes):
        return bad
    if unique_id and isinstance(bad, dict) and bad.get("id") == "bad":
        bad = {**bad, "id": f"bad-{name}"}
    return json.dumps(bad).encode()


@pytest.mark.parametrize(
    ("name", "suffix"),
    [(n, s) for n in ATTACKS for s in (".jsonl", ".json") if s == ".jsonl" or n not in JSONL_ONLY],
)
def test_attack_is_rejected_and_the_good_records_kept(corpus, attack, tmp_path, name, suffix):
    bad, reason, fragment = ATTACKS[name]
    kept, rejects = _run(corpus, tmp_path, [_attack_line(name, attack)], suffix)
    assert kept == KEPT
    assert [r["reason"] for r in rejects] == [reason], rejects
    reject = rejects[0]
    assert fragment in reject["message"], reject["message"]
    assert reject["source"] == f"attack{suffix}" and reject["index"] == 2
    assert reject["line"] == (3 if suffix == ".jsonl" else None)
    bad = bad(attack) if callable(bad) else bad
    if isinstance(bad, dict) and isinstance(bad.get("id"), str):
        assert reject["id"] == bad["id"]
    # Nothing outside the image root was read: its bytes are in no shard.
    secret = attack["secret"].read_bytes()
    assert all(secret not in row["images"] for row in _rows(tmp_path / "out"))


def test_path_escape_is_rejected_under_strict(corpus, attack, tmp_path):
    source = _source(tmp_path, [json.dumps(_image("link-out.png")).encode()], ".json")
    with pytest.raises(PrepareError, match=r"record 2 \(id 'bad'\): image_outside_root: .*symlink"):
        prepare([source], _options(corpus, tmp_path / "out", strict=True))


def test_image_limits_are_options(corpus, attack, tmp_path):
    bad = json.dumps(_image("padded.png")).encode()
    kept, rejects = _run(corpus, tmp_path, [bad], max_image_bytes=100_000)
    assert kept == KEPT
    assert [r["reason"] for r in rejects] == ["image_too_large"]
    assert "> max_image_bytes 100000" in rejects[0]["message"]
    kept, rejects = _run(corpus, tmp_path / "b", [bad])  # the default (256 MiB) takes it
    assert kept == [*KEPT[:2], "bad", KEPT[2]] and rejects == []
    # max_image_side: the 48 x 36 images fit 48, not 40.
    kept, rejects = _run(corpus, tmp_path / "c", [], max_image_side=40)
    assert kept == ["keep-text"] and {r["reason"] for r in rejects} == {"image_too_large"}
    # max_turns / max_text_chars.
    kept, rejects = _run(corpus, tmp_path / "d", [json.dumps(_text("x" * 50)).encode()], max_text_chars=40)
    assert [r["reason"] for r in rejects] == ["oversized_conversation"] and len(kept) == 3


def test_unreadable_image_file_is_a_reject(corpus, attack, tmp_path, monkeypatch):
    """EACCES/EIO while reading (made by hand: the tests may run as root, which chmod does not stop)."""
    target = attack["images"] / "noperm.png"
    target.write_bytes((attack["images"] / "00003.png").read_bytes())
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    kept, rejects = _run(corpus, tmp_path, [json.dumps(_image("noperm.png")).encode()])
    assert kept == KEPT
    assert [r["reason"] for r in rejects] == ["unreadable_image"] and "Permission denied" in rejects[0][
        "message"
    ]


def test_odd_but_valid_images_are_kept_deterministically(corpus, attack, tmp_path):
    """16-bit, CMYK, 1-bit, LA, animated GIF/APNG, EXIF-rotated JPEG: kept, with the pixels decided."""
    images = attack["images"]
    base = Image.open(images / "00001.png").convert("RGB")  # 48 x 36
    levels = np.arange(48 * 36, dtype=np.uint16).reshape(36, 48) * 37
    Image.fromarray(levels).save(images / "deep.png")
    assert Image.open(images / "deep.png").mode == "I;16"
    base.convert("CMYK").save(images / "cmyk.jpg")
    base.convert("1").save(images / "bilevel.png")
    base.convert("LA").save(images / "la.png")
    frames = [base, base.rotate(180)]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(images / "anim.png", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    base.save(images / "rotated.jpg", exif=exif)
    names = ["deep.png", "cmyk.jpg", "bilevel.png", "la.png", "anim.gif", "anim.png", "rotated.jpg"]
    records = [{"id": n, "image": n, "conversations": _turns("<image>\nWhat?")} for n in names]
    source = tmp_path / "odd.json"
    source.write_text(json.dumps(records))
    manifest = prepare([source], _options(corpus, tmp_path / "out"))
    assert manifest["counts"]["rejected"] == 0
    assert manifest["counts"]["converted_modes"] == {"1": 1, "CMYK": 1, "I;16": 1, "LA": 1, "P": 1}
    rows = {r["id"]: r for r in _rows(tmp_path / "out")}
    stored = {n: np.asarray(Image.open(io.BytesIO(rows[n]["images"][0]))) for n in names}
    assert all(a.shape == (36, 48, 3) and a.dtype == np.uint8 for a in stored.values())
    assert all(rows[n]["image_sizes"] == [[48, 36]] for n in names)  # EXIF rotation not applied
    # 16-bit grey is scaled, not clipped (PIL's convert("RGB") would make most of it 255).
    expected = ((levels.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(stored["deep.png"][..., 0], expected)
    assert (stored["deep.png"] == 255).mean() < 0.01
    # Animations: the first frame; the APNG is stored as it is and decodes to that frame too.
    gif_first = np.asarray(Image.open(images / "anim.gif").convert("RGB"))
    np.testing.assert_array_equal(stored["anim.gif"], gif_first)
    assert rows["anim.png"]["images"][0] == (images / "anim.png").read_bytes()
    np.testing.assert_array_equal(stored["anim.png"], np.asarray(base))
    # The EXIF-tagged JPEG is stored byte for byte and decodes to the stored (unrotated) pixels, which
    # is also what load_image (inference) returns.
    assert rows["rotated.jpg"]["images"][0] == (images / "rotated.jpg").read_bytes()
    rgb, data, mode = load_image(images / "rotated.jpg")
    assert rgb.size == (48, 36) and mode == "RGB" and data == rows["rotated.jpg"]["images"][0]
    np.testing.assert_array_equal(stored["rotated.jpg"], np.asarray(rgb))


def test_load_image_keeps_its_contract(corpus, attack):
    """Positional call unchanged for good images; the new limits are keyword-only."""
    path = corpus["synth"].image_root / "00001.png"
    rgb, data, mode = load_image(path)
    assert mode == "RGB" and data == path.read_bytes() and rgb.size == (48, 36)
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(Image.open(path).convert("RGB")))
    gray, _, mode = load_image(corpus["synth"].image_root / "gray.png")
    assert mode == "L" and gray.mode == "RGB"
    with pytest.raises(RecordRejected) as err:
        load_image(path, max_side=40)
    assert err.value.reason == "image_too_large"
    with pytest.raises(RecordRejected) as err:
        load_image(path, max_bytes=10)
    assert err.value.reason == "image_too_large"
    with pytest.raises(RecordRejected) as err:
        load_image(attack["images"] / "nope.png")
    assert err.value.reason == "missing_image"


def test_encodings_and_line_ends_that_are_fine(corpus, tmp_path):
    """A UTF-8 BOM (JSON and JSONL), CRLF line ends and a bare CR between tokens are all good input."""
    body = "\r\n".join(json.dumps(r) for r in KEEP).replace('"conversations":', '\r"conversations":', 1)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + body.encode() + b"\r\n")
    other = [{**r, "id": f"other-{r['id']}"} for r in KEEP]
    json_file = tmp_path / "bom.json"
    json_file.write_bytes(b"\xef\xbb\xbf" + json.dumps(other).encode())
    manifest = prepare([jsonl, json_file], _options(corpus, tmp_path / "out"))
    assert manifest["counts"]["rejected"] == 0
    assert [r["id"] for r in _rows(tmp_path / "out")] == KEPT + [r["id"] for r in other]


def _cli(corpus, tmp_path, sources: list[str], capsys, image_root: Path | None = None) -> tuple[int, str]:
    from maven_dist.cli.prepare import main

    root = image_root or corpus["synth"].image_root
    argv = [*sources, "--image-root", str(root), "--out", str(tmp_path / "cli"),
            "--tokenizer", str(corpus["tok"]), "--workers", "0"]  # fmt: skip
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_source_files_are_errors_that_name_the_file(corpus, tmp_path, capsys):
    good = json.dumps(KEEP).encode()
    cases = {
        "missing.json": (None, "does not exist"),
        "a-directory.json": ("dir", "is not a regular file"),
        "utf16.json": (good.decode().encode("utf-16"), "UTF-16"),
        "utf32.jsonl": ((json.dumps(KEEP[0]) + "\n").encode("utf-32-le"), "UTF-32"),
        "latin1-structure.json": (b"[" + good[1:-1] + b", \xff]", "not valid JSON"),
        "deep.json": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        "top-level-object.json": (b'{"id": "x"}', "top level is dict"),
        "empty.json": (b"", "not valid JSON"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        code, err = _cli(corpus, tmp_path, [str(path)], capsys)
        assert code == 2, name
        assert str(path) in err and fragment in err and "Traceback" not in err, (name, err)
    # A source that exists but cannot be read (EIO: procfs' own memory file, readable by nobody).
    mem = Path("/proc/self/mem")
    if mem.exists():
        link = tmp_path / "unreadable.json"
        link.symlink_to(mem)
        code, err = _cli(corpus, tmp_path, [str(link)], capsys)
        assert code == 2 and "unreadable.json cannot be read" in err, err
    # The image root and the tokenizer must exist.
    source = tmp_path / "good.json"
    source.write_bytes(good)
    code, err = _cli(corpus, tmp_path, [str(source)], capsys, image_root=tmp_path / "no-such-root")
    assert code == 2 and "image root" in err
    with pytest.raises(PrepareError, match="tokenizer directory"):
        prepare([source], _options(corpus, tmp_path / "o", tokenizer_dir=tmp_path / "no-tok"))


def test_every_attack_at_once_with_workers(corpus, attack, tmp_path):
    """All attacks in one file, cut into many shards: two workers give the same shards and rejects."""
    lines = [_attack_line(name, attack, unique_id=True) for name in ATTACKS]
    source = _source(tmp_path, lines, ".jsonl")
    out = {}
    for workers in (0, 2):
        manifest = prepare(
            [source], _options(corpus, tmp_path / f"w{workers}", shard_size=3, num_workers=workers)
        )
        out[workers] = (
            manifest["counts"],
            (tmp_path / f"w{workers}" / "rejects.jsonl").read_text(),
            {p.name: p.read_bytes() for p in list_shards(tmp_path / f"w{workers}")},
        )
    assert out[0] == out[2]
    counts = out[0][0]
    assert counts["kept"] == len(KEEP) and counts["rejected"] == len(ATTACKS)
    expected = Counter(reason for _, reason, _ in ATTACKS.values())
    assert counts["rejected_by_reason"] == dict(sorted(expected.items()))


@pytest.mark.timeout(120)
def test_a_worker_error_ends_the_pool_when_the_caller_only_records_sigterm(corpus, tmp_path):
    """A --strict error in the first shard stops preparation with the others still queued, in a process
    whose SIGTERM handler only records the signal (a trainer's preemption handler). The forked workers
    used to inherit that handler, ignore Pool.terminate() and leave it waiting for them forever."""
    records = [corpus["bad"]["truncated_image"], *[dict(corpus["good"][0], id=f"g{i}") for i in range(8)]]
    source = tmp_path / "records.json"
    source.write_text(json.dumps(records))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(PrepareError, match=r"id 'bad-truncated'.*truncated_image"):
            prepare([source], _options(corpus, tmp_path / "out", shard_size=1, num_workers=2, strict=True))
    finally:
        signal.signal(signal.SIGTERM, previous)
