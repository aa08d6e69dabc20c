"""Synthetic data set: coloured shapes on textured backgrounds, with exact masks and LLaVA-format text.

It is the demo data set (the tiny recipe, the tests), and ground truth for the patch selector and the
questions: every object is known exactly (``offline/synthetic_scene.py`` draws the scenes), so every
answer is true by construction. Some images are not square so that letterboxing
(``ImageTransform.pad_to_square``) matters. Everything is drawn from one generator seeded by ``seed``:
the same seed gives byte-identical files.

Layout under ``out_dir``::

    images/00000.png ...        RGB PNGs
    masks/00000.npz             ``masks`` bool [num_objects, H, W], in annotation order
    captions.json               one caption sample per image (LLaVA format)
    conversations.json          one conversation per image, ``questions_per_image`` turns about it (as
                                LLaVA-Instruct's are multi-turn), and a two-image comparison per image
                                and the next: every question kind the synthetic benchmarks ask, in their
                                phrasings (``offline/synthetic_qa.py``)
    instances.json              COCO instances: images, categories (shape names), annotations
    captions.txt                every text above, one per line (tokenizer and LLM pre-training)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from maven_dist.data.templates import LLAMA_2_SYSTEM, VICUNA_SYSTEM
from maven_dist.offline import synthetic_qa as qa
from maven_dist.offline.synthetic_scene import (
    COLOURS,
    MAX_OBJECTS,
    SHAPES,
    SyntheticImage,
    SyntheticObject,
    draw_scene,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "SyntheticImage",
    "SyntheticObject",
    "SyntheticSet",
    "caption",
    "generate_synthetic",
]

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
_PHRASINGS = (("short", 0.5), ("choice", 0.25), ("sentence", 0.25))


@dataclass
class SyntheticSet:
    root: Path
    images: list[SyntheticImage] = field(default_factory=list)

    @property
    def image_root(self) -> Path:
        return self.root / "images"

    @property
    def captions_json(self) -> Path:
        return self.root / "captions.json"

    @property
    def conversations_json(self) -> Path:
        return self.root / "conversations.json"

    @property
    def instances_json(self) -> Path:
        return self.root / "instances.json"

    @property
    def captions_txt(self) -> Path:
        return self.root / "captions.txt"

    def masks(self, index: int) -> np.ndarray:
        """bool [num_objects, H, W] of image `index`, in the order of its annotations."""
        with np.load(self.root / "masks" / f"{Path(self.images[index].file_name).stem}.npz") as f:
            return f["masks"]


def _plural(n: int, colour: str, shape: str) -> str:
    return f"{_NUMBERS[n]} {colour} {shape}{'' if n == 1 else 's'}"


def _groups(image: SyntheticImage) -> list[tuple[str, str, int]]:
    """(colour, shape, count) in order of first appearance."""
    seen: dict[tuple[str, str], int] = {}
    for o in image.objects:
        seen[(o.colour, o.shape)] = seen.get((o.colour, o.shape), 0) + 1
    return [(c, s, n) for (c, s), n in seen.items()]


def caption(image: SyntheticImage) -> str:
    parts = [_plural(n, c, s) for c, s, n in _groups(image)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {image.background} background."


def _phrase(rng: random.Random, fact: qa.Fact) -> tuple[str, str]:
    phrasing = rng.choices([p for p, _ in _PHRASINGS], weights=[w for _, w in _PHRASINGS])[0]
    if phrasing == "choice":
        return qa.choice(rng, fact)
    return qa.short_answer(fact) if phrasing == "short" else qa.sentence(fact)


def _fact(
    questions: qa.BalancedQuestions, images: list[SyntheticImage], kinds: Sequence[str]
) -> qa.Fact | None:
    """A fact of the first of `kinds` these images can answer, each kind's answers in turn; None when none
    can (yes_no has an answer for every image, compare for any two images with an object)."""
    for kind in kinds:
        fact = questions.ask(kind, images)
        if fact is not None:
            return fact
    return None


def _turns(
    questions: qa.BalancedQuestions, images: list[SyntheticImage], count: int, kinds: Sequence[str]
) -> list[dict[str, str]]:
    """Up to `count` questions about `images` and their answers; the image prefix only on the first. Each
    turn asks another kind first (a conversation of ``len(kinds)`` turns asks every kind the image fits),
    so rarer kinds (a colour question needs a shape that occurs once) are not crowded out."""
    turns = []
    order = questions.rng.sample(list(kinds), len(kinds))
    for k in range(count):
        fact = _fact(questions, images, order[k % len(order) :] + order[: k % len(order)])
        if fact is None:
            break
        prompt, answer = _phrase(questions.rng, fact)
        if turns:
            prompt = prompt.removeprefix(qa.image_prefix(len(images)))
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return turns


def describe_world(
    images: Sequence[SyntheticImage], seed: int, questions_per_image: int, kinds: Sequence[str] = qa.KINDS
) -> tuple[list[dict], list[dict]]:
    """The captions of `images` and their conversations, as LLaVA's JSON files hold them: per image, up to
    `questions_per_image` questions of the single-image `kinds` in turn; per image and the next, a comparison
    (when `kinds` has ``compare``). The images need not be drawn (``synthetic_scene.imagined_scene``)."""
    captions = [
        {
            "id": f"cap-{i:05d}",
            "image": img.file_name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": caption(img)},
            ],
        }
        for i, img in enumerate(images)
    ]
    questions = qa.BalancedQuestions(random.Random(seed))
    single = [k for k in kinds if k in qa.SINGLE_IMAGE_KINDS]
    conversations = []
    for i, img in enumerate(images):
        turns = _turns(questions, [img], questions_per_image, single)
        if turns:
            conversations.append({"id": f"qa-{i:05d}", "image": img.file_name, "conversations": turns})
    for i in range(len(images) if len(images) > 1 and "compare" in kinds else 0):
        pair = [images[i], images[(i + 1) % len(images)]]
        turns = _turns(questions, pair, 1, ["compare"])
        if turns:
            conversations.append(
                {"id": f"mqa-{i:05d}", "image": [p.file_name for p in pair], "conversations": turns}
            )
    return captions, conversations


def generate_synthetic(
    out_dir: Path,
    num_images: int,
    seed: int,
    image_size: int = 112,
    questions_per_image: int = 1,
    kinds: Sequence[str] = qa.KINDS,
    max_objects: int = MAX_OBJECTS,
) -> SyntheticSet:
    """Write the synthetic set (see module docstring) under `out_dir` and describe it; the conversations
    ask questions of `kinds` only (``synthetic_qa.KINDS``; an image none of them fits gets none)."""
    unknown = sorted(set(kinds) - set(qa.KINDS))
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; known: {', '.join(qa.KINDS)}")
    out = SyntheticSet(Path(out_dir))
    out.image_root.mkdir(parents=True, exist_ok=True)
    (out.root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    coco_images, coco_annotations = [], []
    for index in range(num_images):
        # Every third image is landscape, every third portrait (3:4), so letterboxing is exercised.
        width, height = image_size, image_size
        if index % 3 == 1:
            height = image_size * 3 // 4
        elif index % 3 == 2:
            width = image_size * 3 // 4
        scene = draw_scene(rng, height, width, max_objects)
        for obj, mask, segmentation in zip(scene.objects, scene.masks, scene.segmentations, strict=True):
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": index + 1,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": list(obj.bbox),
                    "iscrowd": 0,
                    "colour": obj.colour,
                }
            )
        file_name = f"{index:05d}.png"
        Image.fromarray(scene.pixels, "RGB").save(out.image_root / file_name, optimize=False)
        np.savez_compressed(out.root / "masks" / f"{index:05d}.npz", masks=np.stack(scene.masks))
        coco_images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        out.images.append(SyntheticImage(file_name, width, height, scene.background, tuple(scene.objects)))

    captions, conversations = describe_world(out.images, seed, questions_per_image, kinds)
    instances = {
        "info": {"description": f"maven_dist synthetic shapes, seed {seed}"},
        "images": coco_images,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
        "annotations": coco_annotations,
    }
    out.captions_json.write_text(json.dumps(captions, indent=1))
    out.conversations_json.write_text(json.dumps(conversations, indent=1))
    out.instances_json.write_text(json.dumps(instances))
    texts = [
        t["value"].replace("<image>\n", "") for s in captions + conversations for t in s["conversations"]
    ]
    # The templates' fixed text is part of every training sequence, so the tokenizer learns it as often as
    # training sees it: once per conversation. Its words become single tokens, as "ASSISTANT" is one of
    # LLaMA's, instead of being spelled out letter by letter in each of them (sequences ~2x shorter).
    templates = [VICUNA_SYSTEM, LLAMA_2_SYSTEM, "USER: ASSISTANT:", "[INST] <<SYS>> <</SYS>> [/INST]"]
    texts += templates * len(conversations)
    out.captions_txt.write_text("\n".join(texts) + "\n")
    return out
