"""A small benchmark set with known answers, written in the official layouts the readers read.

The questions are about the synthetic shapes images (``maven_dist/offline/synthetic.py``), whose
objects are known exactly, so every answer is true by construction: "How many red circles are
there?", "Is there a blue square in the image?", "What colour is the circle?". One task per reader
and name (``vqav2``, ``gqa``, ``textvqa``, ``mme``, ``mmbench``, ``seedbench``, ``demon``), 8-16 questions
each, so a whole evaluation runs in seconds on a toy model and an oracle must score the maximum.
Everything is drawn from ``random.Random(seed)``: the same images and seed give the same files.
"""

from __future__ import annotations

import base64
import csv
import json
import random
import shutil
from pathlib import Path

from maven_dist.eval.tasks.vqa import LLAVA_SHORT_ANSWER
from maven_dist.offline.synthetic import COLOURS, SHAPES, SyntheticImage, SyntheticObject, SyntheticSet

TASKS = ("vqav2", "gqa", "textvqa", "mme", "mmbench", "seedbench", "demon")
# Written into every task folder; a folder holding it may be replaced by the next call, others never.
MARKER = ".synthetic"
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_YES_NO = "Please answer yes or no."
_HINT = "The image shows coloured shapes on a textured background."
MIN_IMAGES = 4


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else f"{shape}s"


def _combos(image: SyntheticImage) -> list[tuple[str, str]]:
    """(colour, shape) pairs present, in order of first appearance."""
    return list(dict.fromkeys((o.colour, o.shape) for o in image.objects))


def _absent_combo(rng: random.Random, image: SyntheticImage) -> tuple[str, str]:
    absent = [(c, s) for c in COLOURS for s in SHAPES if image.count(s, c) == 0]
    return rng.choice(absent)


def _unique(image: SyntheticImage, attribute: str) -> list[SyntheticObject]:
    """Objects that are the only one with their shape (or colour) in the image."""
    values = [getattr(o, attribute) for o in image.objects]
    return [o for o in image.objects if values.count(getattr(o, attribute)) == 1]


def _fact(rng: random.Random, image: SyntheticImage, kind: str) -> tuple[str, str, str]:
    """(question, true answer, kind) about one image; falls back to counting when ``kind`` has no subject."""
    if kind == "colour" and _unique(image, "shape"):
        obj = rng.choice(_unique(image, "shape"))
        return f"What colour is the {obj.shape}?", obj.colour, kind
    if kind == "shape" and _unique(image, "colour"):
        obj = rng.choice(_unique(image, "colour"))
        return f"What shape is the {obj.colour} object?", obj.shape, kind
    if kind == "exists":
        colour, shape = rng.choice(_combos(image)) if rng.random() < 0.5 else _absent_combo(rng, image)
        answer = "yes" if image.count(shape, colour) else "no"
        return f"Is there a {colour} {shape} in the image?", answer, kind
    colour, shape = rng.choice(_combos(image)) if rng.random() < 0.7 else _absent_combo(rng, image)
    return f"How many {colour} {_plural(shape)} are there?", str(image.count(shape, colour)), "count"


def _wrong(rng: random.Random, answer: str, kind: str) -> str:
    if kind == "count":
        return str(max(0, int(answer) + rng.choice((-1, 1))) if answer != "0" else 1)
    pool = {"exists": ("yes", "no"), "colour": tuple(COLOURS), "shape": SHAPES}[kind]
    return rng.choice([a for a in pool if a != answer])


def _humans(rng: random.Random, answer: str, kind: str) -> list[str]:
    """Ten VQA-style human answers: 6-9 give the truth (one as a number word), the rest a wrong one."""
    agree = rng.randint(6, 9)
    humans = [answer] * agree + [_wrong(rng, answer, kind) for _ in range(10 - agree)]
    if kind == "count":
        humans[0] = _NUMBER_WORDS[int(answer)]  # normalises to the digit: still agrees
    rng.shuffle(humans)
    return humans


def _describe(image: SyntheticImage) -> str:
    parts = []
    for colour, shape in _combos(image):
        n = image.count(shape, colour)
        parts.append(f"{_NUMBER_WORDS[n]} {colour} {_plural(shape, n)}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _load_set(images: SyntheticSet | Path) -> SyntheticSet:
    """The set itself, or one read back from a ``generate_synthetic`` directory (its ``instances.json``)."""
    if isinstance(images, SyntheticSet):
        return images
    root = Path(images)
    if not (root / "instances.json").is_file() and (root.parent / "instances.json").is_file():
        root = root.parent  # given the images/ folder
    instances = json.loads((root / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[SyntheticObject]] = {}
    for a in instances["annotations"]:
        objects.setdefault(a["image_id"], []).append(
            SyntheticObject(names[a["category_id"]], a["colour"], tuple(a["bbox"]))
        )
    out = SyntheticSet(root)
    for entry in instances["images"]:
        out.images.append(
            SyntheticImage(
                entry["file_name"], entry["width"], entry["height"], "", tuple(objects[entry["id"]])
            )
        )
    return out


def _task_dir(out_root: Path, name: str) -> Path:
    folder = out_root / name
    if folder.exists():
        if not (folder / MARKER).exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} exists and was not written by write_synthetic_benchmarks; not replaced"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by maven_dist.eval.synthetic; replaced on the next call\n")
    return folder


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _copy(synthetic: SyntheticSet, image: SyntheticImage, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synthetic.image_root / image.file_name, to)


# ------------------------------------------------------------------------------------------- writers


def _write_vqa(synthetic: SyntheticSet, folder: Path, rng: random.Random, style: str) -> None:
    kinds = ("count", "exists", "colour", "shape")
    questions, answers = [], []
    for i, image in enumerate(synthetic.images[:16]):
        question, answer, kind = _fact(rng, image, kinds[i % len(kinds)])
        _copy(synthetic, image, folder / "images" / image.file_name)
        qid = 1000 + i
        if style == "gqa":  # LLaVA's GQA file carries the instruction already, string ids
            questions.append(
                {
                    "question_id": str(qid),
                    "image": image.file_name,
                    "text": f"{question}\n{LLAVA_SHORT_ANSWER}",
                }
            )
            answers.append({"question_id": str(qid), "answer": answer})
        else:
            questions.append(
                {"question_id": qid, "image": image.file_name, "text": question, "category": "default"}
            )
            answers.append({"question_id": qid, "answers": _humans(rng, answer, kind)})
    _write_jsonl(folder / "questions.jsonl", questions)
    _write_jsonl(folder / "answers.jsonl", answers)


def _mme_pair(rng: random.Random, image: SyntheticImage, subtask: str) -> list[tuple[str, str]]:
    """The (question, Yes|No) pair of one image: one true, one false statement, in random order."""
    if subtask == "existence":
        (c1, s1), (c2, s2) = rng.choice(_combos(image)), _absent_combo(rng, image)
        pair = [(f"Is there a {c1} {s1} in the image?", "Yes"), (f"Is there a {c2} {s2} in the image?", "No")]
    elif subtask == "count":
        shape = rng.choice(_combos(image))[1]
        n = image.count(shape)
        pair = [
            (f"Are there exactly {n} {_plural(shape, n)} in the image?", "Yes"),
            (f"Are there exactly {n + 1} {_plural(shape, n + 1)} in the image?", "No"),
        ]
    elif subtask == "color":
        present = sorted({o.colour for o in image.objects})
        absent = [c for c in COLOURS if c not in present]
        pair = [
            (f"Is there a {rng.choice(present)} object in the image?", "Yes"),
            (f"Is there a {rng.choice(absent)} object in the image?", "No"),
        ]
    else:  # numerical_calculation
        total = image.count("circle") + image.count("square")
        pair = [
            (f"Is the number of circles plus the number of squares equal to {total}?", "Yes"),
            (f"Is the number of circles plus the number of squares equal to {total + 2}?", "No"),
        ]
    rng.shuffle(pair)
    return [(f"{question} {_YES_NO}", answer) for question, answer in pair]


def _write_mme(synthetic: SyntheticSet, folder: Path, rng: random.Random) -> None:
    # Both official layouts: flat (image + .txt side by side) and split (images/ + questions_answers_YN/).
    layouts = {"existence": "flat", "count": "split", "color": "flat", "numerical_calculation": "split"}
    for s, (subtask, layout) in enumerate(layouts.items()):
        for k in range(4):
            image = synthetic.images[(4 * s + k) % len(synthetic.images)]
            stem = f"{subtask[:3]}_{k:03d}"
            image_dir = folder / subtask / ("images" if layout == "split" else "")
            text_dir = folder / subtask / ("questions_answers_YN" if layout == "split" else "")
            _copy(synthetic, image, image_dir / f"{stem}.png")
            text_dir.mkdir(parents=True, exist_ok=True)
            pair = _mme_pair(rng, image, subtask)
            (text_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))


def _choice_question(
    rng: random.Random, image: SyntheticImage, i: int, num_options: int
) -> tuple[str, list[str], int, str]:
    """(question, options, index of the true option, category) with ``num_options`` distinct options."""
    unique = _unique(image, "shape")
    if i % 2 and unique:
        obj = rng.choice(unique)
        options = [obj.colour, *rng.sample([c for c in COLOURS if c != obj.colour], num_options - 1)]
        question, category = f"What colour is the {obj.shape}?", "attribute_recognition"
    else:
        shape = rng.choice(SHAPES)
        n = image.count(shape)
        options = [str(n), *map(str, rng.sample([m for m in range(7) if m != n], num_options - 1))]
        question, category = f"How many {_plural(shape)} are in the image?", "counting"
    truth = options[0]
    rng.shuffle(options)
    return question, options, options.index(truth), category


def _write_mmbench(synthetic: SyntheticSet, folder: Path, rng: random.Random) -> None:
    letters = "ABCD"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with (folder / "mmbench_synthetic.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for i, image in enumerate(synthetic.images[:8]):
            num_options = 3 if i % 3 == 2 else 4  # some rows leave D empty, as MMBench does
            question, options, truth, category = _choice_question(rng, image, i, num_options)
            encoded = base64.b64encode((synthetic.image_root / image.file_name).read_bytes()).decode("ascii")
            cells = options + [""] * (4 - num_options)
            hint = _HINT if i % 2 == 0 else ""
            writer.writerow([i, question, hint, *cells, letters[truth], category, "perception", encoded])


def _write_seedbench(synthetic: SyntheticSet, folder: Path, rng: random.Random) -> None:
    questions = []
    images = synthetic.images
    for i, image in enumerate(images[:8]):
        question, options, truth, category = _choice_question(rng, image, i, 4)
        stem = Path(image.file_name).stem
        _copy(
            synthetic, image, folder / "SEED-Bench-image" / f"{stem}.png"
        )  # data_id without suffix, as released
        record = {f"choice_{'abcd'[k]}": option for k, option in enumerate(options)}
        type_id = 3 if category == "attribute_recognition" else 5
        record.update(
            answer="ABCD"[truth],
            data_id=stem,
            data_type="image",
            question=question,
            question_id=str(100 + i),
            question_type_id=type_id,
        )
        questions.append(record)
    for v in range(2):  # "videos" of two frames: two images, asked about together
        first, second = images[(2 * v) % len(images)], images[(2 * v + 1) % len(images)]
        qid = f"v{v}"
        for k, frame in enumerate((first, second), start=1):
            _copy(
                synthetic,
                frame,
                folder / "SEED-Bench-video-image" / "task10" / "ssv2_8_frame" / qid / f"{k}.png",
            )
        shape = rng.choice(SHAPES)
        n = first.count(shape) + second.count(shape)
        options = [str(n), *map(str, rng.sample([m for m in range(9) if m != n], 3))]
        rng.shuffle(options)
        record = {f"choice_{'abcd'[k]}": option for k, option in enumerate(options)}
        record.update(
            answer="ABCD"[options.index(str(n))],
            data_id=f"{qid}.webm",
            data_type="video",
            question=f"How many {_plural(shape)} are there in the two frames together?",
            question_id=qid,
            question_type_id=10,
        )
        questions.append(record)
    (folder / "SEED-Bench.json").write_text(
        json.dumps(
            {
                "questions": questions,
                "question_type": {
                    "Instance Attributes": 3,
                    "Instances Counting": 5,
                    "Action Recognition": 10,
                },
            },
            indent=1,
        )
    )


def _write_demon(synthetic: SyntheticSet, folder: Path, rng: random.Random) -> None:
    images = synthetic.images
    tasks = {
        "comparison": ("accuracy", "Look at both images, then answer with one word."),
        "description": ("rouge_l", None),
    }
    for name, (metric, instruction) in tasks.items():
        task = folder / name
        task.mkdir()
        descriptor: dict = {"name": name, "metric": metric}
        if instruction:
            descriptor["instruction"] = instruction
        (task / "task.json").write_text(json.dumps(descriptor))
        instances = []
        for i in range(6):
            a, b = images[i % len(images)], images[(i + 1 + rng.randrange(len(images) - 1)) % len(images)]
            files = [f"images/{i:02d}_1.png", f"images/{i:02d}_2.png"]
            _copy(synthetic, a, task / files[0])
            _copy(synthetic, b, task / files[1])
            if metric == "accuracy":
                colour, shape = rng.choice(_combos(a) + _combos(b))
                na, nb = a.count(shape, colour), b.count(shape, colour)
                answer = "same" if na == nb else ("first" if na > nb else "second")
                prompt = f"<image>\n<image>\nWhich image has more {colour} {_plural(shape)}: first, second or same?"
                instances.append(
                    {
                        "id": str(i),
                        "prompt": prompt,
                        "images": files,
                        "answer": answer,
                        "choices": ["first", "second", "same"],
                    }
                )
            else:
                prompt = "First image: <image>\nSecond image: <image>\nList the shapes in the second image."
                instances.append({"id": str(i), "prompt": prompt, "images": files, "answer": _describe(b)})
        _write_jsonl(task / "instances.jsonl", instances)


def write_synthetic_benchmarks(out_root: Path, images: SyntheticSet | Path, seed: int = 0) -> list[str]:
    """Write one small known-answer benchmark per task name under ``out_root/<name>/``; return the names.

    ``images`` is a :class:`SyntheticSet` or the directory ``generate_synthetic`` wrote (at least 4
    images). A task folder left by an earlier call is replaced; any other existing, non-empty folder
    of the same name is an error (FileExistsError), never overwritten.
    """
    synthetic = _load_set(images)
    if len(synthetic.images) < MIN_IMAGES:
        raise ValueError(f"{len(synthetic.images)} synthetic images; at least {MIN_IMAGES} are needed")
    out_root = Path(out_root)
    rng = random.Random(seed)
    _write_vqa(synthetic, _task_dir(out_root, "vqav2"), rng, "vqav2")
    _write_vqa(synthetic, _task_dir(out_root, "gqa"), rng, "gqa")
    _write_vqa(synthetic, _task_dir(out_root, "textvqa"), rng, "textvqa")
    _write_mme(synthetic, _task_dir(out_root, "mme"), rng)
    _write_mmbench(synthetic, _task_dir(out_root, "mmbench"), rng)
    _write_seedbench(synthetic, _task_dir(out_root, "seedbench"), rng)
    _write_demon(synthetic, _task_dir(out_root, "demon"), rng)
    return list(TASKS)
