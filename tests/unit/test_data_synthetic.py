"""Synthetic shapes set (exact masks, COCO annotations, LLaVA JSON) and the tiny recipe's tokenizer."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from transformers import AutoTokenizer

from maven_dist.contract.prompts import SHORT_ANSWER
from maven_dist.offline.synthetic import COLOURS, SHAPES, caption, generate_synthetic
from maven_dist.offline.tokenizer_training import BYTE_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), num_images=9, seed=3, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed(synth, tmp_path):
    again = generate_synthetic(tmp_path / "a", num_images=9, seed=3, image_size=64)
    assert _files(again.root) == _files(synth.root)
    other = generate_synthetic(tmp_path / "b", num_images=9, seed=4, image_size=64)
    assert _files(other.root)["captions.json"] != _files(synth.root)["captions.json"]


def test_coco_annotations_decode_to_the_exact_masks_and_pixels(synth):
    coco = COCO(str(synth.instances_json))
    assert [c["name"] for c in coco.dataset["categories"]] == list(SHAPES)
    kinds = set()
    for index, info in enumerate(coco.dataset["images"]):
        image = synth.images[index]
        assert (info["file_name"], info["width"], info["height"]) == (
            image.file_name,
            image.width,
            image.height,
        )
        pixels = np.asarray(Image.open(synth.image_root / image.file_name).convert("RGB"))
        assert pixels.shape == (image.height, image.width, 3)
        masks = synth.masks(index)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        assert len(anns) == len(masks) == len(image.objects)
        for ann, mask, obj in zip(anns, masks, image.objects, strict=True):
            kinds.add(type(ann["segmentation"]).__name__)
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum() > 0
            assert coco.cats[ann["category_id"]]["name"] == obj.shape and ann["colour"] == obj.colour
            assert (pixels[mask] == COLOURS[obj.colour]).all()
        overlap = masks.sum(0)
        assert overlap.max() <= 1  # objects never hide each other
    assert kinds == {"list", "dict"}  # polygons and RLE both occur
    assert {(i.width == i.height) for i in synth.images} == {True, False}  # letterboxing matters


def test_llava_json_matches_the_objects(synth):
    captions = json.loads(synth.captions_json.read_text())
    assert len(captions) == len(synth.images)
    for record, image in zip(captions, synth.images, strict=True):
        assert record["image"] == image.file_name
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert record["conversations"][1]["value"] == caption(image)
    conversations = json.loads(synth.conversations_json.read_text())
    pairs = [c for c in conversations if isinstance(c["image"], list)]
    assert len(pairs) == len(synth.images)  # each image with the next
    by_name = {i.file_name: i for i in synth.images}
    for record in pairs:
        question, answer = (t["value"] for t in record["conversations"])
        assert question.startswith("<image>\n<image>\nWhich image has more ")
        if question.endswith(SHORT_ANSWER):  # the other phrasings are checked in test_synthetic_qa.py
            *colour, plural = question.split("more ")[1].split(":")[0].split()
            na, nb = (by_name[n].count(plural[:-1], colour[0] if colour else None) for n in record["image"])
            assert answer == ("same" if na == nb else "first" if na > nb else "second"), (question, na, nb)
    singles = [c for c in conversations if isinstance(c["image"], str)]
    assert len(singles) == len(synth.images)  # questions_per_image=1
    for record in singles:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) == 2
        assert all("<image>" not in t["value"] for t in turns[1:])
    assert len({c["id"] for c in captions + conversations}) == len(captions) + len(conversations)


def test_tokenizer_layout_roundtrip_and_determinism(synth, tmp_path):
    texts = synth.captions_txt.read_text().splitlines()
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=600)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert [loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id] == [
        0,
        1,
        2,
        0,
    ]
    assert loaded.convert_ids_to_tokens(list(range(3, 259))) == BYTE_TOKENS
    assert len(loaded) <= 600
    for text in ["A red circle on a striped background.", "Ünïcødé 日本語 ✓ and\ttabs\nnewlines"]:
        ids = loaded(text).input_ids
        assert ids[0] == 1 and loaded.unk_token_id not in ids
        assert loaded.decode(ids, skip_special_tokens=True) == text
    # Learned pieces make in-domain text shorter than bytes.
    assert len(loaded.encode(texts[1], add_special_tokens=False)) < len(texts[1].encode()) / 2
    again = train_tokenizer(texts, tmp_path / "tok2", vocab_size=600)
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        tmp_path / "tok2" / "tokenizer.json"
    ).read_bytes()
    assert again.get_vocab() == tok.get_vocab()


def test_cli_writes_the_same_set(synth, tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic.py"
    argv = [
        "make_synthetic.py",
        str(tmp_path / "cli"),
        "--num-images",
        "9",
        "--seed",
        "3",
        "--image-size",
        "64",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(script), run_name="__main__")
    assert code.value.code == 0
    assert _files(tmp_path / "cli") == _files(synth.root)


def test_every_kind_gets_its_share_of_the_training_questions(tmp_path):
    # Issue 22: with the kind drawn afresh for every question, the kinds that cannot be asked of every image
    # (a colour question needs a shape that occurs once) were crowded out by those that always can: 479 of
    # 4,000 single-image questions asked a colour. Each turn of a conversation now asks another kind first.
    synth = generate_synthetic(tmp_path, num_images=60, seed=0, image_size=64, questions_per_image=5)
    starts = {"colour": "What colour", "shape": "What shape", "exists": "Is there", "count": "How many",
              "yes_no": "Are there exactly"}  # fmt: skip
    asked = dict.fromkeys(starts, 0)
    for record in json.loads(synth.conversations_json.read_text()):
        if isinstance(record["image"], str):
            for turn in record["conversations"][::2]:
                question = turn["value"].removeprefix("<image>\n")
                asked[next(k for k, s in starts.items() if question.startswith(s))] += 1
    assert min(asked.values()) >= 0.6 * sum(asked.values()) / len(asked), asked


def test_the_tokenizer_learns_the_templates_words_whole(synth, tmp_path):
    # Issue 22: trained on the texts alone, "ASSISTANT:" and the system prompt were spelled out letter by
    # letter in every sequence; the synthetic texts now carry the templates as often as training sees them.
    tok = train_tokenizer(synth.captions_txt.read_text().splitlines(), tmp_path / "tok", vocab_size=600)
    for words in ("USER:", "ASSISTANT:", "A chat between a curious user"):
        assert len(tok.encode(words, add_special_tokens=False)) == len(words.split()), words


def test_scenes_described_but_not_drawn_are_written_as_the_drawn_ones_are(synth):
    """The LLM's extra pretraining text (demo.llm_text_scenes): scenes composed as drawn ones are, and
    described by the same code that describes the drawn images."""
    from maven_dist.offline.synthetic import describe_world
    from maven_dist.offline.synthetic_scene import imagined_scene

    rng = np.random.default_rng(0)
    scenes = [imagined_scene(rng, f"text-{i}", 112, max_objects=3) for i in range(200)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3} and len({s.background for s in scenes}) > 1
    captions, chats = describe_world(scenes, seed=0, questions_per_image=5)
    assert [c["conversations"][1]["value"] for c in captions] == [caption(s) for s in scenes]
    turns = [t for c in chats for t in c["conversations"]]
    assert len(chats) == 2 * len(scenes) and len(turns) > 6 * len(scenes)  # 5 questions each, one comparison
    # The drawn set's files come from the same function.
    drawn = json.loads(synth.captions_json.read_text()), json.loads(synth.conversations_json.read_text())
    assert describe_world(synth.images, seed=3, questions_per_image=1) == drawn
