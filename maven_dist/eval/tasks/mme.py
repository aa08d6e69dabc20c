"""MME read from its official release directory (``MME_Benchmark_release_version``).

Layout of ``BENCH_ROOT/mme/`` (the release unpacked as it is; a single ``MME_Benchmark/`` level in
between is accepted too): one folder per subtask, named as in ``scoring.mme.ALL_SUBTASKS``
(``existence``, ``count``, ..., ``OCR``, ``code_reasoning``), each in one of the two official forms::

    count/000000006040.jpg  count/000000006040.txt          images and same-stem .txt side by side
    artwork/images/10002.jpg  artwork/questions_answers_YN/10002.txt       or split in two folders

Each ``.txt`` holds the image's two questions, one a line, ``question<TAB>Yes`` or ``question<TAB>No``
(blank lines are ignored). Question ids are ``<subtask>/<txt stem>#<line 1 or 2>``.

Prompt: ``prompt_style="llava"`` (default) is LLaVA-1.5's ``llava_mme.jsonl``: the official question
with its trailing "Please answer yes or no." replaced by "\\nAnswer the question using a single word
or phrase."; ``"official"`` asks the question as the release words it. Both after ``"<image>\\n"``.

Metrics (``scoring.mme``): ``<subtask>`` (100 * acc + 100 * acc+, at most 200) for every subtask
present, ``perception``, ``cognition`` and ``total`` (their sum). Subtasks may be absent (the totals
then cover fewer and are not comparable with published ones: :attr:`MmeTask.missing_subtasks`).

Bad input, all :class:`BenchmarkError` naming the file and line (MME's acc+ pairs the two questions
of an image, so nothing can be skipped without changing every score): a line that is not
``question<TAB>Yes|No``, an image with other than two questions or the same question twice, a
``.txt`` without its image or with several (``x.jpg`` and ``x.png``), a file or folder that leads
out of the task directory. A folder whose name is not a subtask but which holds ``.txt`` files is not
read and is listed in ``skipped`` (a misspelt subtask would otherwise vanish unnoticed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from maven_dist.contract.prompts import SHORT_ANSWER
from maven_dist.eval.scoring import mme as mme_scoring
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question
from maven_dist.eval.tasks.vqa import (
    IMAGE_PLACEHOLDER,
    check_inside,
    check_predictions,
    read_text,
    resolve_inside,
    task_root,
    with_instruction,
)

PromptStyle = Literal["llava", "official"]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
_SPLIT_IMAGES, _SPLIT_QUESTIONS = "images", "questions_answers_YN"
# Some official questions have two spaces before this sentence; LLaVA's converter copes with both.
_YES_NO_SUFFIX = re.compile(r"\s*Please answer yes or no\.\s*$")


def llava_question(question: str) -> str:
    """The official MME question as LLaVA-1.5 asks it (see the module docstring)."""
    return with_instruction(_YES_NO_SUFFIX.sub("", question), SHORT_ANSWER)


def _subtask_root(root: Path) -> Path:
    if (
        not any((root / name).is_dir() for name in mme_scoring.ALL_SUBTASKS)
        and (root / "MME_Benchmark").is_dir()
    ):
        return root / "MME_Benchmark"
    return root


class MmeTask:
    """MME's yes/no questions from the release directory (layout in the module docstring)."""

    format = "mme"

    def __init__(self, root: Path, *, name: str = "mme", prompt_style: PromptStyle = "llava") -> None:
        if prompt_style not in ("llava", "official"):
            raise ValueError(f"unknown prompt_style {prompt_style!r}; expected 'llava' or 'official'")
        self.name = name
        self.prompt_style = prompt_style
        self.root = task_root(root)
        self.skipped: list[str] = []
        base = _subtask_root(self.root)
        self._questions: list[Question] = []
        present = []
        for subtask in mme_scoring.ALL_SUBTASKS:
            folder = check_inside(self.root, base / subtask)
            if folder.is_dir():
                present.append(subtask)
                self._questions += self._read_subtask(subtask, folder)
        for folder in sorted(base.iterdir()):
            if folder.is_dir() and folder.name not in mme_scoring.ALL_SUBTASKS and any(folder.glob("*.txt")):
                self.skipped.append(f"{folder}: not an MME subtask name, not read")
        if not present:
            raise BenchmarkError(
                f"{base}: no MME subtask folder ({', '.join(mme_scoring.ALL_SUBTASKS)}); "
                "unpack MME_Benchmark_release_version here"
            )
        self.missing_subtasks = [s for s in mme_scoring.ALL_SUBTASKS if s not in present]

    def _read_subtask(self, subtask: str, folder: Path) -> list[Question]:
        if (folder / _SPLIT_IMAGES).is_dir() and (folder / _SPLIT_QUESTIONS).is_dir():
            image_dir, text_dir = folder / _SPLIT_IMAGES, folder / _SPLIT_QUESTIONS
        else:
            image_dir = text_dir = folder
        check_inside(self.root, image_dir)
        check_inside(self.root, text_dir)
        images: dict[str, list[str]] = {}
        for path in image_dir.iterdir():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.setdefault(path.stem, []).append(path.name)
        questions: list[Question] = []
        texts = sorted(text_dir.glob("*.txt"))
        if not texts:
            raise BenchmarkError(f"{text_dir}: MME subtask {subtask} has no question .txt files")
        for text_file in texts:
            text_file = check_inside(self.root, text_file)
            questions += self._read_image(subtask, text_file, image_dir, images.get(text_file.stem, []))
        return questions

    def _read_image(self, subtask: str, text_file: Path, image_dir: Path, names: list[str]) -> list[Question]:
        image_id = text_file.stem
        if len(names) != 1:
            found = "no image" if not names else f"several images ({', '.join(sorted(names))})"
            raise BenchmarkError(
                f"{text_file}: record {subtask}/{image_id}: {found} named {image_id}.* in {image_dir}"
            )
        image = resolve_inside(self.root, image_dir, names[0], file=text_file, record=f"{subtask}/{image_id}")
        pairs: list[tuple[int, str, str]] = []
        for number, line in enumerate(read_text(text_file).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            answer = fields[-1].strip().capitalize() if len(fields) == 2 else ""
            if answer not in ("Yes", "No") or not fields[0].strip():
                raise BenchmarkError(
                    f"{text_file}:{number}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}"
                )
            if any(fields[0] == question for _, question, _ in pairs):
                raise BenchmarkError(f"{text_file}:{number}: question {fields[0]!r} appears twice")
            pairs.append((number, fields[0], answer))
        if len(pairs) != mme_scoring.QUESTIONS_PER_IMAGE:
            raise BenchmarkError(
                f"{text_file}: record {subtask}/{image_id}: {len(pairs)} questions, MME asks "
                f"{mme_scoring.QUESTIONS_PER_IMAGE} per image"
            )
        questions = []
        for k, (_, question, answer) in enumerate(pairs, start=1):
            asked = llava_question(question) if self.prompt_style == "llava" else question
            questions.append(
                Question(
                    id=f"{subtask}/{image_id}#{k}",
                    prompt=f"{IMAGE_PLACEHOLDER}\n{asked}",
                    images=(image,),
                    reference=answer,
                    meta={"subtask": subtask, "image_id": image_id, "question": question},
                )
            )
        return questions

    def questions(self) -> list[Question]:
        """Every question: subtasks in MME's order, images by name, the two questions in file order."""
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """``<subtask>`` scores, ``perception``, ``cognition`` and ``total`` by the official MME rules."""
        check_predictions(self.name, self._questions, predictions)
        records = [
            mme_scoring.MmeRecord(
                q.meta["subtask"], q.meta["image_id"], predictions[q.id].prediction, q.reference
            )
            for q in self._questions
        ]
        result = mme_scoring.score_mme(records, allow_missing=True)
        metrics = {name: score.score for name, score in result.subtasks.items()}
        metrics.update(
            perception=result.perception,
            cognition=result.cognition,
            total=result.perception + result.cognition,
        )
        return metrics
