"""Multiple-choice benchmarks: MMBench (official TSV, circular evaluation) and SEED-Bench (official JSON).

Every question is asked twice (``base.py``): by generated letter (``#gen``, ``mode="generate"``) and by
option likelihood (``#ll``, ``mode="choice"``).

* ``generate``: LLaVA-1.5's prompt (``llava/eval/model_vqa_mmbench.py``, ``--single-pred-prompt``)::

      <image>
      [hint]
      question
      A. option
      B. option
      Answer with the option's letter from the given choices directly.

  MMBench reads the generated text's letter with ``scoring.multiple_choice.extract_choice``
  (VLMEvalKit's rules; ``None``, a miss, when it names no single option); SEED-Bench counts the
  generation right only when it is the letter itself (``llava_letter_match``, LLaVA's SEED script).
* ``choice``: the prompt is ``<image>\\n[hint\\n]question`` without the options, and ``options`` are the
  option texts to score as continuations, as SEED-Bench's official ``eval.py`` ranks them. The
  chosen letter is ``Prediction.prediction`` when it is one of the option letters, else the
  argmax of ``Prediction.scores`` (``choose_by_likelihood``: ties go to the first option).

Bad input is a :class:`BenchmarkError` naming the file, line or record and the question id, never a
skip: an accuracy over a subset is not the benchmark's.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from maven_dist.contract.prompts import CHOICE_LETTER
from maven_dist.eval.scoring import multiple_choice as mc
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question
from maven_dist.eval.tasks.vqa import (
    IMAGE_PLACEHOLDER,
    check_inside,
    check_predictions,
    data_file,
    read_json,
    record_id,
    resolve_inside,
    task_root,
)

GEN, LL = "gen", "ll"

# MMBench images are well under 1 MiB; the caps only stop a hostile file from filling memory or disk.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
_IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}
# VLMEvalKit's TSVs may give a row's image as the index of another row holding it (short string).
_IMAGE_REFERENCE_MAX_CHARS = 64


def option_prompt(question: str, options: Sequence[str]) -> str:
    """The question, its options as ``A. text`` lines and LLaVA's answer-by-letter instruction."""
    letters = mc.option_letters(len(options))
    lines = [question, *(f"{letter}. {text}" for letter, text in zip(letters, options, strict=True))]
    return "\n".join([*lines, CHOICE_LETTER])


def _placeholders(num_images: int) -> str:
    return "\n".join([IMAGE_PLACEHOLDER] * num_images)


def ask_both_ways(
    question_id: str, question: str, options: Sequence[str], answer: str, images: tuple[Path, ...], meta: dict
) -> tuple[Question, Question]:
    """The ``#gen`` and ``#ll`` Questions of one multiple-choice question (prompts in the module docstring)."""
    placeholders = _placeholders(len(images))
    meta = {**meta, "option_texts": tuple(options)}
    generate = Question(
        id=f"{question_id}#{GEN}",
        prompt=f"{placeholders}\n{option_prompt(question, options)}",
        images=images,
        reference=answer,
        meta={**meta, "way": GEN},
    )
    choice = Question(
        id=f"{question_id}#{LL}",
        prompt=f"{placeholders}\n{question}",
        images=images,
        mode="choice",
        options=tuple(options),
        reference=answer,
        meta={**meta, "way": LL},
    )
    return generate, choice


def predicted_letter(question: Question, prediction: Prediction) -> str | None:
    """The option letter a prediction picks (rules in the module docstring); ``None`` for none."""
    options = question.meta["option_texts"]
    letters = mc.option_letters(len(options))
    if question.mode == "generate":
        return mc.extract_choice(prediction.prediction, options)
    letter = prediction.prediction.strip()
    if letter in tuple(letters):  # a tuple: "" and "AB" are substrings of "ABCD", not letters
        return letter
    if not prediction.scores:
        return None
    if len(prediction.scores) != len(options):
        raise ValueError(
            f"question {question.id}: {len(prediction.scores)} option scores for {len(options)} options"
        )
    return letters[mc.choose_by_likelihood(prediction.scores)]


def _absent(value: str | None) -> bool:
    # LLaVA's is_none() on pandas-read cells: NaN (an empty cell) and the strings "nan" / "none".
    return value is None or value.strip().lower() in ("", "nan", "none")


# ------------------------------------------------------------------------------------------ MMBench


def _read_tsv(path: Path, field_limit: int) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, cells) rows of a TSV written by pandas (quoted cells may hold tabs, newlines)."""
    previous = csv.field_size_limit()
    csv.field_size_limit(field_limit)  # process-wide; restored below (readers run one at a time)
    line = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            rows = []
            header: list[str] | None = None
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue
                if header is None:
                    header = [cell.strip() for cell in cells]
                else:
                    rows.append((line, cells))
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: file not found (see docs/evaluation.md for the layout)") from None
    except UnicodeDecodeError as error:
        raise BenchmarkError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise BenchmarkError(
            f"{path}:{line + 1}: cannot be parsed as TSV ({error}); cells are capped at {field_limit} characters"
        ) from None
    finally:
        csv.field_size_limit(previous)
    if header is None:
        raise BenchmarkError(f"{path}: empty TSV")
    return header, rows


def decode_image(
    encoded: str,
    cache_dir: Path,
    *,
    where: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Path:
    """Decode a base64 image into ``cache_dir`` (named by its sha256) after checking size and format."""
    if len(encoded) > 4 * (max_bytes // 3 + 1):
        raise BenchmarkError(f"{where}: base64 image of {len(encoded)} characters exceeds {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BenchmarkError(f"{where}: image is not valid base64 ({error})") from None
    if len(data) > max_bytes:
        raise BenchmarkError(f"{where}: image of {len(data)} bytes exceeds {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Only the header is read so far: check the size before any pixel is decoded.
            width, height = image.size
            if width * height > max_pixels:
                raise BenchmarkError(f"{where}: image of {width}x{height} pixels exceeds {max_pixels}")
            suffix = _IMAGE_FORMATS.get(image.format or "")
            if suffix is None:
                raise BenchmarkError(
                    f"{where}: image format {image.format} is not one of {', '.join(_IMAGE_FORMATS)}"
                )
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise BenchmarkError(f"{where}: image cannot be decoded ({error})") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not path.is_file():
        # Content-addressed and written atomically, so tasks and concurrent runs may share the cache.
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, path)
    return path


class MMBenchTask:
    """MMBench from its official TSV, evaluated circularly (CircularEval) both ways.

    Layout: ``BENCH_ROOT/mmbench/<one>.tsv`` (``mmbench_dev_20230712.tsv``, ``MMBench_DEV_EN.tsv``, ...):
    columns ``index, question, hint, A, B, C, D, answer, category, l2-category, image`` (``image`` the
    base64 image, or the ``index`` of a row holding it; ``hint``/``category`` optional). Options run
    from A to the first empty one (LLaVA's rule); a filled option after an empty one is an error.
    Images are decoded once into ``cache_dir``.

    Each row with N options becomes N rotations (``scoring.multiple_choice.circular_variants``: the
    options shift one place left each time, the letters stay), each asked ``#gen`` and ``#ll``; ids
    ``<index>/<rotation>#gen``. Metrics: ``circular_gen``, ``vanilla_gen`` (rotation 0 only),
    ``circular_ll``, ``vanilla_ll``, in percent. With the option-free ``#ll`` prompt the rotations
    only reorder the scored options, so ``circular_ll`` differs from ``vanilla_ll`` only where the
    model's scores depend on that order.

    Errors (file, line and index named): a missing ``answer`` (the test split has none: use dev), an
    answer that is not an offered letter, an index twice, fewer than 2 options, bad or oversized
    base64, an undecodable image, a malformed TSV.
    """

    format = "multiple_choice"

    def __init__(
        self,
        root: Path,
        cache_dir: Path,
        *,
        name: str = "mmbench",
        tsv: str | None = None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.name = name
        self.root = task_root(root)
        self.cache_dir = Path(cache_dir)
        self.skipped: list[str] = []
        self._max_bytes, self._max_pixels = max_image_bytes, max_image_pixels
        path = data_file(self.root, tsv) if tsv else self._find_tsv()
        self._questions = self._read(path)

    def _find_tsv(self) -> Path:
        found = sorted(self.root.glob("*.tsv"))
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise BenchmarkError(f"{self.root}: expected exactly one MMBench .tsv file, found {listed}")
        return check_inside(self.root, found[0])

    def _read(self, path: Path) -> list[Question]:
        # The csv cap is only a backstop: an oversized image is reported by decode_image, with its index.
        header, rows = _read_tsv(path, field_limit=8 * (self._max_bytes // 3 + 1) + (1 << 20))
        required = ("index", "question", "answer", "image", "A", "B")
        missing = [column for column in required if column not in header]
        if missing:
            hint = " (the test split has no answers: use dev)" if "answer" in missing else ""
            raise BenchmarkError(f"{path}:1: columns {', '.join(missing)} missing{hint}")
        letters = [c for c in mc.OPTION_LETTERS if c in header]
        records: list[tuple[int, dict[str, str]]] = []
        for line, cells in rows:
            if len(cells) != len(header):
                raise BenchmarkError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)}")
            records.append((line, dict(zip(header, cells, strict=True))))
        images_by_index = {r["index"].strip(): r["image"] for _, r in records}
        decoded: dict[str, Path] = {}
        questions: list[Question] = []
        seen: set[str] = set()
        for line, row in records:
            index = record_id(row["index"].strip(), file=path, line=line, key="index")
            where = f"{path}:{line}: index {index}"
            if index in seen:
                raise BenchmarkError(f"{where}: index appears twice")
            seen.add(index)
            options = self._options(row, letters, where)
            answer = row["answer"].strip()
            if _absent(answer):
                raise BenchmarkError(f"{where}: no answer (the test split has none: use dev)")
            if answer not in tuple(mc.option_letters(len(options))):
                raise BenchmarkError(
                    f"{where}: answer {answer!r} is not one of the options {mc.option_letters(len(options))}"
                )
            image = self._image(row["image"], images_by_index, decoded, where)
            question = row["question"]
            if not _absent(row.get("hint")):
                question = f"{row['hint']}\n{question}"
            meta = {
                "source_id": index,
                "category": row.get("category", ""),
                "l2_category": row.get("l2-category", ""),
            }
            for rotation, (rotated, rotated_answer) in enumerate(mc.circular_variants(options, answer)):
                questions += ask_both_ways(
                    f"{index}/{rotation}",
                    question,
                    rotated,
                    rotated_answer,
                    (image,),
                    {**meta, "rotation": rotation},
                )
        if not questions:
            raise BenchmarkError(f"{path}: no questions")
        return questions

    @staticmethod
    def _options(row: dict[str, str], letters: list[str], where: str) -> list[str]:
        options: list[str] = []
        for letter in letters:
            if _absent(row[letter]):
                break
            options.append(row[letter])
        later = [letter for letter in letters[len(options) :] if not _absent(row[letter])]
        if later:
            raise BenchmarkError(
                f"{where}: option {', '.join(later)} given after the empty option {letters[len(options)]}"
            )
        if len(options) < 2:
            raise BenchmarkError(
                f"{where}: {len(options)} options, a multiple-choice question needs at least 2"
            )
        return options

    def _image(
        self, cell: str, images_by_index: dict[str, str], decoded: dict[str, Path], where: str
    ) -> Path:
        key = cell.strip()
        if len(key) <= _IMAGE_REFERENCE_MAX_CHARS and key in images_by_index:
            referenced = images_by_index[key].strip()
            if len(referenced) <= _IMAGE_REFERENCE_MAX_CHARS:
                raise BenchmarkError(f"{where}: image refers to row {key}, which holds no image either")
            key = referenced
        if key not in decoded:
            decoded[key] = decode_image(
                key, self.cache_dir, where=where, max_bytes=self._max_bytes, max_pixels=self._max_pixels
            )
        return decoded[key]

    def questions(self) -> list[Question]:
        """Per row in TSV order, per rotation: the ``#gen`` then the ``#ll`` question."""
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """``circular_gen``, ``vanilla_gen``, ``circular_ll``, ``vanilla_ll`` (percent)."""
        check_predictions(self.name, self._questions, predictions)
        metrics: dict[str, float] = {}
        for way in (GEN, LL):
            result = mc.score_circular(
                mc.RotationPrediction(
                    question_id=q.meta["source_id"],
                    rotation=q.meta["rotation"],
                    predicted=predicted_letter(q, predictions[q.id]),
                    answer=q.reference,
                )
                for q in self._questions
                if q.meta["way"] == way
            )
            metrics[f"circular_{way}"] = result.circular
            metrics[f"vanilla_{way}"] = result.vanilla
        return metrics


# ---------------------------------------------------------------------------------------- SEED-Bench

SEED_CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
SEED_IMAGE_DIR = "SEED-Bench-image"
SEED_VIDEO_DIR = "SEED-Bench-video-image"
# The 8-frame release (v1_video.zip): SEED-Bench-video-image/task<T>/<source>_8_frame/<question_id>/<k>.png
SEED_FRAME_SOURCES = {10: "ssv2", 11: "kitchen", 12: "breakfast"}
MAX_FRAMES = 32


def _frame_order(path: Path) -> tuple[int, str]:
    # Frames are numbered 1.png ... 8.png: order by number, so 10.png comes after 9.png.
    return (int(path.stem), path.name) if path.stem.isdigit() else (1 << 30, path.name)


class SeedBenchTask:
    """SEED-Bench (v1) from its official JSON, asked both ways, no rotation.

    Layout of ``BENCH_ROOT/seedbench/``::

        SEED-Bench.json            {"questions": [{question_id, question, choice_a..choice_d, answer,
                                                   data_type: image|video, data_id, question_type_id}]}
        SEED-Bench-image/<data_id>                           image questions (``.jpg``/``.png`` appended
                                                             when ``data_id`` has no suffix)
        SEED-Bench-video-image/task<T>/<src>_8_frame/<question_id>/1.png ... 8.png
                                                             video questions (T = question_type_id:
                                                             10 ssv2, 11 kitchen, 12 breakfast; a
                                                             ``v1_video/`` level in between is accepted)

    A video question may instead list its frames, ``"frames": ["frames/v1/1.png", ...]`` (relative to
    the task directory), which wins. All of a video's frames are given, in frame-number order, each
    with its own ``<image>`` (multi-image), at most ``max_frames``.

    Ids ``<question_id>#gen`` / ``#ll``. Metrics: ``accuracy_gen``, ``accuracy_ll`` and, per data type
    present, ``accuracy_gen/image``, ``accuracy_gen/video``, ``accuracy_ll/image``, ``accuracy_ll/video``.

    Errors (file, record index and question id named): invalid JSON, a question id twice, a missing
    or non-A-D answer, a missing choice, an unknown data type, a missing image or frame folder, more
    than ``max_frames`` frames, a path leading out of the task directory.
    """

    format = "multiple_choice"

    def __init__(self, root: Path, *, name: str = "seedbench", max_frames: int = MAX_FRAMES) -> None:
        self.name = name
        self.root = task_root(root)
        self.max_frames = max_frames
        self.skipped: list[str] = []
        self._questions = self._read(data_file(self.root, "SEED-Bench.json"))

    def _read(self, path: Path) -> list[Question]:
        document = read_json(path)
        items = document.get("questions") if isinstance(document, dict) else document
        if not isinstance(items, list):
            raise BenchmarkError(f"{path}: expected {{'questions': [...]}} or a list of questions")
        questions: list[Question] = []
        seen: set[str] = set()
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise BenchmarkError(f"{path}: questions[{position}] is not an object")
            qid = record_id(
                item.get("question_id"), file=path, line=None, key=f"questions[{position}].question_id"
            )
            where = f"{path}: questions[{position}] (question_id {qid})"
            if qid in seen:
                raise BenchmarkError(f"{where}: question id appears twice")
            seen.add(qid)
            options = [item.get(key) for key in SEED_CHOICES]
            if not all(isinstance(option, str) for option in options):
                raise BenchmarkError(f"{where}: {', '.join(SEED_CHOICES)} must all be strings")
            answer = item.get("answer")
            if answer not in tuple(mc.option_letters(len(SEED_CHOICES))):
                raise BenchmarkError(f"{where}: answer {answer!r} is missing or not one of A, B, C, D")
            question = item.get("question")
            if not isinstance(question, str):
                raise BenchmarkError(f"{where}: 'question' is missing or not a string")
            data_type = item.get("data_type")
            if data_type == "image":
                images: tuple[Path, ...] = (self._image(item.get("data_id"), path, qid),)
            elif data_type == "video":
                images = self._frames(item, path, qid, where)
            else:
                raise BenchmarkError(
                    f"{where}: data_type {data_type!r} is not 'image' or 'video' (SEED-Bench v1)"
                )
            meta = {
                "source_id": qid,
                "data_type": data_type,
                "question_type_id": item.get("question_type_id"),
            }
            questions += ask_both_ways(qid, question, options, answer, images, meta)
        if not questions:
            raise BenchmarkError(f"{path}: no questions")
        return questions

    def _image(self, data_id: object, path: Path, qid: str) -> Path:
        base = self.root / SEED_IMAGE_DIR
        if isinstance(data_id, str) and not Path(data_id).suffix:
            for suffix in (".jpg", ".png"):
                if (base / f"{data_id}{suffix}").exists():
                    data_id = f"{data_id}{suffix}"
                    break
        return resolve_inside(self.root, base, data_id, file=path, record=f"question_id {qid}")

    def _frames(self, item: dict, path: Path, qid: str, where: str) -> tuple[Path, ...]:
        record = f"question_id {qid}"
        listed = item.get("frames")
        if listed is not None:
            if not isinstance(listed, list) or not listed:
                raise BenchmarkError(f"{where}: 'frames' must be a non-empty list of paths")
            frames = [resolve_inside(self.root, self.root, f, file=path, record=record) for f in listed]
        else:
            source = SEED_FRAME_SOURCES.get(item.get("question_type_id"))  # type: ignore[arg-type]
            if source is None:
                raise BenchmarkError(
                    f"{where}: video question of type {item.get('question_type_id')!r} (not 10, 11, 12) "
                    "without a 'frames' list"
                )
            relative = Path(f"task{item['question_type_id']}") / f"{source}_8_frame" / qid
            candidates = [
                self.root / SEED_VIDEO_DIR / relative,
                self.root / SEED_VIDEO_DIR / "v1_video" / relative,
            ]
            folder = next((c for c in candidates if c.is_dir()), None)
            if folder is None:
                raise BenchmarkError(f"{where}: no frame folder {candidates[0]} (or give a 'frames' list)")
            check_inside(self.root, folder)
            names = sorted(
                (p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")),
                key=_frame_order,
            )
            frames = [resolve_inside(self.root, folder, p.name, file=path, record=record) for p in names]
            if not frames:
                raise BenchmarkError(f"{where}: frame folder {folder} holds no .png/.jpg frames")
        if len(frames) > self.max_frames:
            raise BenchmarkError(f"{where}: {len(frames)} frames, at most {self.max_frames} (max_frames)")
        return tuple(frames)

    def questions(self) -> list[Question]:
        """Per question in JSON order: the ``#gen`` then the ``#ll`` question."""
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """``accuracy_gen``, ``accuracy_ll`` and per data type ``accuracy_<way>/<data_type>`` (percent)."""
        check_predictions(self.name, self._questions, predictions)
        hits: dict[str, list[bool]] = {}
        for q in self._questions:
            way = q.meta["way"]
            prediction = predictions[q.id]
            if way == GEN:  # LLaVA-1.5's SEED rule: the generation is the letter, nothing else
                hit = mc.llava_letter_match(prediction.prediction, q.reference)
            else:
                hit = predicted_letter(q, prediction) == q.reference
            hits.setdefault(f"accuracy_{way}", []).append(hit)
            hits.setdefault(f"accuracy_{way}/{q.meta['data_type']}", []).append(hit)
        return {name: mc.accuracy(values) for name, values in sorted(hits.items())}
