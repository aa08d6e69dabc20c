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
    conversations.json          ``questions_per_image`` single-image samples per image (some multi-turn)
                                and a two-image comparison per pair of images: every question kind the
                                synthetic benchmarks ask, in their phrasings (``offline/synthetic_qa.py``)
    instances.json              COCO instances: images, categories (shape names), annotations
    captions.txt                every text above, one per line (tokenizer and LLM pre-training)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from maven_dist.data.templates import LLAMA_2_SYSTEM, VICUNA_SYSTEM
from maven_dist.offline import synthetic_qa as qa
from maven_dist.offline.synthetic_scene import (
    COLOURS,
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
_SECOND_TURN = 0.3
"""Share of single-image samples that ask a second question about the same image (multi-turn)."""


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


def _fact(questions: qa.BalancedQuestions, images: list[SyntheticImage]) -> qa.Fact:
    """A fact of a random kind these images can answer, each kind's answers in turn (two images: a
    comparison). Where no kind has its next answer here, any answer the images have."""
    rng = questions.rng
    kinds = ("compare",) if len(images) == 2 else qa.SINGLE_IMAGE_KINDS
    for kind in rng.sample(kinds, len(kinds)):
        fact = questions.ask(kind, images)
        if fact is not None:
            return fact
    facts = (qa.ask(rng, kinds[0], images, answer) for answer in qa.ANSWERS[kinds[0]])
    return next(fact for fact in facts if fact is not None)


def _turns(questions: qa.BalancedQuestions, images: list[SyntheticImage]) -> list[dict[str, str]]:
    rng = questions.rng
    prompt, answer = _phrase(rng, _fact(questions, images))
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    if len(images) == 1 and rng.random() < _SECOND_TURN:
        prompt, answer = _phrase(rng, _fact(questions, images))
        turns += [
            {"from": "human", "value": prompt.removeprefix(qa.image_prefix(1))},
            {"from": "gpt", "value": answer},
        ]
    return turns


def generate_synthetic(
    out_dir: Path, num_images: int, seed: int, image_size: int = 112, questions_per_image: int = 1
) -> SyntheticSet:
    """Write the synthetic set (see module docstring) under `out_dir` and describe it."""
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
        scene = draw_scene(rng, height, width)
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

    captions = [
        {
            "id": f"cap-{i:05d}",
            "image": img.file_name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": caption(img)},
            ],
        }
        for i, img in enumerate(out.images)
    ]
    questions = qa.BalancedQuestions(random.Random(seed))
    conversations = [
        {"id": f"qa-{i:05d}-{k}", "image": img.file_name, "conversations": _turns(questions, [img])}
        for i, img in enumerate(out.images)
        for k in range(questions_per_image)
    ]
    for i in range(num_images // 2):
        a, b = out.images[2 * i], out.images[2 * i + 1]
        conversations.append(
            {
                "id": f"mqa-{i:05d}",
                "image": [a.file_name, b.file_name],
                "conversations": _turns(questions, [a, b]),
            }
        )
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
    # The templates' fixed text is part of every training sequence, so the tokenizer should learn it too.
    texts += [VICUNA_SYSTEM, LLAMA_2_SYSTEM, "USER: ASSISTANT:", "[INST] <<SYS>> <</SYS>> [/INST]"]
    out.captions_txt.write_text("\n".join(texts) + "\n")
    return out
