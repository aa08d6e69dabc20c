"""A benchmark set with known answers, written in the official layouts the readers read.

The questions are about synthetic shapes images (``maven_dist/offline/synthetic.py``) whose objects are
known exactly, so every answer is true by construction, and they are asked as the demo's training data
asks them (``offline/synthetic_qa.py``): "How many red circles are there?", "Is there a blue square in the
image?", "What colour is the circle?". Give it images no model was trained on (the demo writes it from
its held-out images). One task per reader and name (``vqav2``, ``gqa``, ``textvqa``, ``mme``, ``mmbench``,
``seedbench``, ``demon``), ``questions_per_task`` questions each (16 by default, so a whole evaluation
runs in seconds on a toy model and an oracle must score the maximum), and ``heldout``: one DEMON-style
sub-task per question kind (``colour``, ``shape``, ``exists``, ``count``, ``yes_no``, ``compare`` and
``choice``, the single-image kinds by option letter), ``heldout_per_kind`` questions each, whose
accuracies with and without images (``maven eval --control``) show what the model learned to see.
Everything is drawn from ``random.Random(seed)``: the same images and seed give the same files.
"""

from __future__ import annotations

import base64
import csv
import json
import random
import shutil
from pathlib import Path

from maven_dist.contract.prompts import SHORT_ANSWER
from maven_dist.offline import synthetic_qa as qa
from maven_dist.offline.synthetic import COLOURS, SHAPES, SyntheticImage, SyntheticObject, SyntheticSet

TASKS = ("vqav2", "gqa", "textvqa", "mme", "mmbench", "seedbench", "demon", "heldout")
# Written into every task folder; a folder holding it may be replaced by the next call, others never.
MARKER = ".synthetic"
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_YES_NO = "Please answer yes or no."
_HINT = "The image shows coloured shapes on a textured background."
MIN_IMAGES = 4
HELDOUT_KINDS = (*qa.KINDS, "choice")
"""The held-out sub-tasks: every question kind asked for a short answer, and ``choice``: the single-image
kinds asked with lettered options."""


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else f"{shape}s"


def _combos(image: SyntheticImage) -> list[tuple[str, str]]:
    """(colour, shape) pairs present, in order of first appearance."""
    return list(dict.fromkeys((o.colour, o.shape) for o in image.objects))


def _absent_combo(rng: random.Random, image: SyntheticImage) -> tuple[str, str]:
    absent = [(c, s) for c in COLOURS for s in SHAPES if image.count(s, c) == 0]
    return rng.choice(absent)


def _fact(questions: qa.BalancedQuestions, images: list[SyntheticImage], kinds: tuple[str, ...]) -> qa.Fact:
    """A fact of the first of `kinds` these images can answer, balanced per kind; ``exists`` (one image) or
    any comparison (two) where none can."""
    for kind in kinds:
        fact = questions.ask(kind, images)
        if fact is not None:
            return fact
    last = "compare" if len(images) == 2 else "exists"
    facts = (qa.ask(questions.rng, last, images, answer) for answer in qa.ANSWERS[last])
    return next(fact for fact in facts if fact is not None)


def _humans(rng: random.Random, fact: qa.Fact) -> list[str]:
    """Ten VQA-style human answers: 6-9 give the truth (one as a number word), the rest a wrong one."""
    agree = rng.randint(6, 9)
    wrong = [a for a in fact.alternatives if a != fact.answer]
    humans = [fact.answer] * agree + [rng.choice(wrong) for _ in range(10 - agree)]
    if fact.kind == "count":
        humans[0] = _NUMBER_WORDS[int(fact.answer)]  # normalises to the digit: still agrees
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
    (folder / MARKER).write_text(
        "written by maven_dist.offline.synthetic_benchmarks; replaced on the next call\n"
    )
    return folder


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _copy(synthetic: SyntheticSet, image: SyntheticImage, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synthetic.image_root / image.file_name, to)


# ------------------------------------------------------------------------------------------- writers


def _write_vqa(
    synthetic: SyntheticSet, folder: Path, questions: qa.BalancedQuestions, style: str, count: int
) -> None:
    rng = questions.rng
    records, answers = [], []
    for i in range(count):
        image = synthetic.images[i % len(synthetic.images)]
        fact = _fact(questions, [image], (qa.SINGLE_IMAGE_KINDS[i % len(qa.SINGLE_IMAGE_KINDS)],))
        _copy(synthetic, image, folder / "images" / image.file_name)
        qid = 1000 + i
        if style == "gqa":  # LLaVA's GQA file carries the instruction already, string ids
            records.append(
                {
                    "question_id": str(qid),
                    "image": image.file_name,
                    "text": f"{fact.question}\n{SHORT_ANSWER}",
                }
            )
            answers.append({"question_id": str(qid), "answer": fact.answer})
        else:
            records.append(
                {"question_id": qid, "image": image.file_name, "text": fact.question, "category": fact.kind}
            )
            answers.append({"question_id": qid, "answers": _humans(rng, fact)})
    _write_jsonl(folder / "questions.jsonl", records)
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


def _write_mme(synthetic: SyntheticSet, folder: Path, rng: random.Random, per_subtask: int) -> None:
    # Both official layouts: flat (image + .txt side by side) and split (images/ + questions_answers_YN/).
    layouts = {"existence": "flat", "count": "split", "color": "flat", "numerical_calculation": "split"}
    for s, (subtask, layout) in enumerate(layouts.items()):
        for k in range(per_subtask):
            image = synthetic.images[(per_subtask * s + k) % len(synthetic.images)]
            stem = f"{subtask[:3]}_{k:03d}"
            image_dir = folder / subtask / ("images" if layout == "split" else "")
            text_dir = folder / subtask / ("questions_answers_YN" if layout == "split" else "")
            _copy(synthetic, image, image_dir / f"{stem}.png")
            text_dir.mkdir(parents=True, exist_ok=True)
            pair = _mme_pair(rng, image, subtask)
            (text_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))


_CATEGORIES = {"colour": "attribute_recognition", "shape": "attribute_recognition", "count": "counting"}


def _choice_question(
    questions: qa.BalancedQuestions, image: SyntheticImage, i: int, num_options: int
) -> tuple[str, list[str], int, str]:
    """(question, options, index of the true option, category) with ``num_options`` distinct options."""
    fact = _fact(questions, [image], ("colour", "count") if i % 2 else ("count", "shape"))
    options = qa.choice_options(questions.rng, fact, num_options)
    return fact.question, options, options.index(fact.answer), _CATEGORIES.get(fact.kind, "existence")


def _write_mmbench(
    synthetic: SyntheticSet, folder: Path, questions: qa.BalancedQuestions, count: int
) -> None:
    letters = "ABCD"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with (folder / "mmbench_synthetic.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for i in range(count):
            image = synthetic.images[i % len(synthetic.images)]
            num_options = 3 if i % 3 == 2 else 4  # some rows leave D empty, as MMBench does
            question, options, truth, category = _choice_question(questions, image, i, num_options)
            encoded = base64.b64encode((synthetic.image_root / image.file_name).read_bytes()).decode("ascii")
            cells = options + [""] * (4 - num_options)
            hint = _HINT if i % 2 == 0 else ""
            writer.writerow([i, question, hint, *cells, letters[truth], category, "perception", encoded])


def _write_seedbench(
    synthetic: SyntheticSet, folder: Path, questions: qa.BalancedQuestions, count: int
) -> None:
    rng = questions.rng
    records = []
    images = synthetic.images
    for i in range(count):
        image = images[i % len(images)]
        question, options, truth, category = _choice_question(questions, image, i, 4)
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
        records.append(record)
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
        records.append(record)
    (folder / "SEED-Bench.json").write_text(
        json.dumps(
            {
                "questions": records,
                "question_type": {
                    "Instance Attributes": 3,
                    "Instances Counting": 5,
                    "Action Recognition": 10,
                },
            },
            indent=1,
        )
    )


def _pair(synthetic: SyntheticSet, i: int) -> list[SyntheticImage]:
    images = synthetic.images
    return [images[(2 * i) % len(images)], images[(2 * i + 1) % len(images)]]


def _write_demon(synthetic: SyntheticSet, folder: Path, questions: qa.BalancedQuestions, count: int) -> None:
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
        for i in range(count):
            a, b = _pair(synthetic, i)
            files = [f"images/{i:03d}_1.png", f"images/{i:03d}_2.png"]
            _copy(synthetic, a, task / files[0])
            _copy(synthetic, b, task / files[1])
            if metric == "accuracy":
                fact = _fact(questions, [a, b], ("compare",))
                prompt = qa.image_prefix(2) + fact.question
                choices = list(fact.alternatives)
                instances.append(
                    {
                        "id": str(i),
                        "prompt": prompt,
                        "images": files,
                        "answer": fact.answer,
                        "choices": choices,
                    }
                )
            else:
                prompt = "First image: <image>\nSecond image: <image>\nList the shapes in the second image."
                instances.append({"id": str(i), "prompt": prompt, "images": files, "answer": _describe(b)})
        _write_jsonl(task / "instances.jsonl", instances)


def _write_heldout(
    synthetic: SyntheticSet, folder: Path, questions: qa.BalancedQuestions, per_kind: int
) -> None:
    """One sub-task per held-out kind (``HELDOUT_KINDS``), ``per_kind`` questions each, answered exactly."""
    for kind in HELDOUT_KINDS:
        task = folder / kind
        task.mkdir()
        (task / "task.json").write_text(json.dumps({"name": kind, "metric": "accuracy"}))
        instances, i = [], 0
        while len(instances) < per_kind:
            if i >= 20 * (per_kind + len(synthetic.images)):
                raise ValueError(f"{len(synthetic.images)} images do not give {per_kind} {kind} questions")
            images = (
                _pair(synthetic, i) if kind == "compare" else [synthetic.images[i % len(synthetic.images)]]
            )
            i += 1
            if kind == "choice":
                asked = qa.SINGLE_IMAGE_KINDS[len(instances) % len(qa.SINGLE_IMAGE_KINDS)]
                prompt, answer = qa.choice(questions.rng, _fact(questions, images, (asked,)))
            else:
                fact = questions.ask(kind, images)
                if fact is None:
                    continue
                prompt, answer = qa.short_answer(fact)
            files = [f"images/{image.file_name}" for image in images]
            for image, file in zip(images, files, strict=True):
                if not (task / file).exists():
                    _copy(synthetic, image, task / file)
            instances.append({"id": str(len(instances)), "prompt": prompt, "images": files, "answer": answer})
        _write_jsonl(task / "instances.jsonl", instances)


def write_synthetic_benchmarks(
    out_root: Path,
    images: SyntheticSet | Path,
    seed: int = 0,
    questions_per_task: int = 16,
    heldout_per_kind: int = 16,
) -> list[str]:
    """Write one known-answer benchmark per task name under ``out_root/<name>/``; return the names.

    ``images`` is a :class:`SyntheticSet` or the directory ``generate_synthetic`` wrote (at least 4
    images; give images no evaluated model was trained on). ``questions_per_task`` sets the size of the
    seven benchmark-format tasks (MMBench asks each question in four rotations, MME two per image),
    ``heldout_per_kind`` the size of each held-out sub-task. A task folder left by an earlier call is
    replaced; any other existing, non-empty folder of the same name is an error (FileExistsError), never
    overwritten.
    """
    synthetic = _load_set(images)
    if len(synthetic.images) < MIN_IMAGES:
        raise ValueError(f"{len(synthetic.images)} synthetic images; at least {MIN_IMAGES} are needed")
    out_root = Path(out_root)
    rng = random.Random(seed)
    questions = qa.BalancedQuestions(rng)
    n = questions_per_task
    _write_vqa(synthetic, _task_dir(out_root, "vqav2"), questions, "vqav2", n)
    _write_vqa(synthetic, _task_dir(out_root, "gqa"), questions, "gqa", n)
    _write_vqa(synthetic, _task_dir(out_root, "textvqa"), questions, "textvqa", n)
    _write_mme(synthetic, _task_dir(out_root, "mme"), rng, max(1, n // 4))
    _write_mmbench(synthetic, _task_dir(out_root, "mmbench"), questions, max(1, n // 2))
    _write_seedbench(synthetic, _task_dir(out_root, "seedbench"), questions, max(1, n // 2))
    _write_demon(synthetic, _task_dir(out_root, "demon"), questions, max(1, n // 2))
    _write_heldout(synthetic, _task_dir(out_root, "heldout"), questions, heldout_per_kind)
    return list(TASKS)
