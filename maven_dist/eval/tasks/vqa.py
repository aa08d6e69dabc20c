"""Open-ended VQA (VQA v2, TextVQA, GQA) in LLaVA's question/answer JSONL layout, and the file helpers
every reader shares.

Layout of a task directory (``BENCH_ROOT/vqav2/``, ``BENCH_ROOT/gqa/``, ``BENCH_ROOT/textvqa/``)::

    questions.jsonl   {"question_id": 262144000, "image": "COCO_val2014_000000262144.jpg", "text": "..."}
    answers.jsonl     {"question_id": 262144000, "answers": ["net", "net", ... 10 strings]}   (vqav2, textvqa)
                      {"question_id": "20240871", "answer": "yes"}                             (gqa)
    images/           the images; ``image`` is relative to it (``image_root`` to change that)

``questions.jsonl`` is LLaVA's eval file as released (``llava_vqav2_mscoco_*.jsonl``,
``llava_gqa_testdev_balanced.jsonl``, ``llava_textvqa_val_v051_ocr.jsonl``); extra keys (``category``)
are ignored. ``answers`` may also be VQA's annotation form, a list of ``{"answer": ...}`` objects.
The answers file may hold answers for questions that are not asked (an official annotation file
for a question subset): those are not used.

Prompt: ``"<image>\\n" + text + "\\nAnswer the question using a single word or phrase."`` as LLaVA-1.5
asks. LLaVA's released question files already end with that instruction; it is then not added again.

Scoring (``maven_dist.eval.scoring.vqa``): ``vqav2`` the VQA v2 normalisation and leave-one-out
accuracy over the 10 humans, ``textvqa`` the same with the m4c (MMF) normalisation, ``gqa`` exact
match after LLaVA's normalisation. Metric ``accuracy``, a percentage.

Bad input, all :class:`BenchmarkError` naming the file, line and question id (none is skipped: a
VQA number over fewer questions is not comparable with published ones, and a missing file is
fixed by the user, not worked around): unparsable JSON, a question id twice (in either file), a
question without an answer, not exactly 10 human answers (vqav2, textvqa), an image path that is
absolute or leaves the task directory (also through a symlink), a missing image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from maven_dist.contract.prompts import SHORT_ANSWER
from maven_dist.eval.scoring import vqa as vqa_scoring
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question

IMAGE_PLACEHOLDER = "<image>"

# kind -> how one prediction is scored against a question's reference.
_SCORERS: dict[str, Callable[[str, Any], float]] = {
    "vqav2": lambda prediction, answers: vqa_scoring.vqa_accuracy(prediction, answers, variant="vqa_v2"),
    "textvqa": lambda prediction, answers: vqa_scoring.vqa_accuracy(prediction, answers, variant="m4c"),
    "gqa": vqa_scoring.gqa_exact_match,
}
VQA_KINDS: tuple[str, ...] = tuple(_SCORERS)


# ----------------------------------------------------------------------------- shared file helpers
# Used by every reader (mme, multiple_choice, multi_image too): one place that decides what an
# untrusted path or record may be.


def task_root(root: Path) -> Path:
    """The task directory, resolved (the directory itself may be a symlink); BenchmarkError if absent."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: benchmark directory not found (see docs/evaluation.md for its layout)")
    return root.resolve()


def resolve_inside(root: Path, base: Path, relative: object, *, file: Path, record: str) -> Path:
    """``base / relative`` as an existing file inside ``root`` (symlinks resolved), else BenchmarkError.

    ``root`` must already be resolved (:func:`task_root`); ``base`` is a directory under it that
    relative names start from. Absolute names, ``..`` that climbs out, and symlinks that lead out
    are refused rather than followed: the benchmark files are untrusted.
    """
    where = f"{file}: record {record}"
    if not isinstance(relative, str) or not relative.strip():
        raise BenchmarkError(f"{where}: image path {relative!r} is not a non-empty string")
    if "\x00" in relative:
        raise BenchmarkError(f"{where}: image path {relative!r} contains a NUL byte")
    if Path(relative).is_absolute():
        raise BenchmarkError(
            f"{where}: image path {relative!r} is absolute; paths must be relative to {base}"
        )
    try:
        resolved = (base / relative).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise BenchmarkError(f"{where}: image path {relative!r} cannot be resolved ({error})") from None
    if not resolved.is_relative_to(root):
        raise BenchmarkError(
            f"{where}: image path {relative!r} leads outside the benchmark directory {root} "
            "(through '..' or a symlink); copy the image into the task directory"
        )
    if not resolved.is_file():
        raise BenchmarkError(f"{where}: image {relative!r} not found (looked for {resolved})")
    return resolved


def check_inside(root: Path, path: Path) -> Path:
    """``path`` (a benchmark file or folder under ``root``), refusing one that leads out through a symlink.

    Missing paths are left to the caller (:func:`read_text` names them).
    """
    if path.exists() and not path.resolve().is_relative_to(root):
        raise BenchmarkError(f"{path}: leads outside the benchmark directory {root} (a symlink); copy it in")
    return path


def data_file(root: Path, relative: str) -> Path:
    """``root / relative`` through :func:`check_inside`: a data file (``questions.jsonl``, a TSV) of a task."""
    return check_inside(root, root / relative)


def read_text(path: Path) -> str:
    """A UTF-8 text file; BenchmarkError naming it when it is missing or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: file not found (see docs/evaluation.md for the layout)") from None
    except UnicodeDecodeError as error:
        raise BenchmarkError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise BenchmarkError(f"{path}: cannot be read ({error.strerror})") from None


def read_json(path: Path) -> Any:
    """A JSON document; parse errors become BenchmarkError with the file and line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise BenchmarkError(f"{path}: JSON nested too deeply") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; BenchmarkError for a line that is not an object."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise BenchmarkError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(value, dict):
            raise BenchmarkError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append((number, value))
    return records


def record_id(value: object, *, file: Path, line: int | None, key: str) -> str:
    """A record id (a string or an integer, as the benchmarks use) as a string."""
    where = f"{file}:{line}" if line is not None else str(file)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BenchmarkError(f"{where}: {key} {value!r} is not a non-empty string or an integer")
    return str(value)


def text_field(fields: Mapping, key: str, *, file: Path, line: int | None, record: str) -> str:
    """``fields[key]`` as a string; BenchmarkError naming the record when it is missing or not text."""
    value = fields.get(key)
    if not isinstance(value, str):
        where = f"{file}:{line}" if line is not None else str(file)
        raise BenchmarkError(f"{where}: record {record}: {key!r} is missing or not a string ({value!r})")
    return value


def check_predictions(
    task: str, questions: Iterable[Question], predictions: Mapping[str, Prediction]
) -> None:
    """ValueError naming (up to 5 of) the questions without a prediction: a partial score is not a score."""
    missing = [q.id for q in questions if q.id not in predictions]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{task}: {len(missing)} questions have no prediction: {shown}")


def with_instruction(text: str, instruction: str) -> str:
    """``text`` ending with ``instruction`` on its own line, unless it already does."""
    if text.rstrip().endswith(instruction):
        return text
    return f"{text}\n{instruction}"


# ------------------------------------------------------------------------------------------ reader


def _human_answers(value: object, *, file: Path, line: int, record: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BenchmarkError(f"{file}:{line}: question {record}: 'answers' is missing or not a list")
    answers = []
    for item in value:
        # VQA's own annotation files list {"answer": ..., "answer_confidence": ..., "answer_id": ...}.
        text = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise BenchmarkError(f"{file}:{line}: question {record}: human answer {item!r} is not a string")
        answers.append(text)
    if len(answers) != vqa_scoring.VQA_NUM_ANSWERS:
        raise BenchmarkError(
            f"{file}:{line}: question {record}: {len(answers)} human answers, the VQA accuracy needs "
            f"{vqa_scoring.VQA_NUM_ANSWERS}"
        )
    return tuple(answers)


class VqaTask:
    """One open-ended VQA benchmark read from its task directory (layout in the module docstring)."""

    format = "vqa"

    def __init__(self, root: Path, kind: str, *, name: str | None = None, image_root: str = "images") -> None:
        if kind not in _SCORERS:
            raise ValueError(f"unknown VQA kind {kind!r}; expected one of {', '.join(VQA_KINDS)}")
        self.kind = kind
        self.name = name or kind
        self.root = task_root(root)
        self.skipped: list[str] = []
        self._scorer = _SCORERS[kind]
        answers = self._read_answers(data_file(self.root, "answers.jsonl"))
        questions_file = data_file(self.root, "questions.jsonl")
        self._questions = self._read_questions(questions_file, self.root / image_root, answers)

    def _read_answers(self, path: Path) -> dict[str, Any]:
        answers: dict[str, Any] = {}
        for line, record in read_jsonl(path):
            qid = record_id(record.get("question_id"), file=path, line=line, key="question_id")
            if qid in answers:
                raise BenchmarkError(f"{path}:{line}: question {qid} answered twice")
            if self.kind == "gqa":
                answers[qid] = text_field(record, "answer", file=path, line=line, record=qid)
            else:
                answers[qid] = _human_answers(record.get("answers"), file=path, line=line, record=qid)
        return answers

    def _read_questions(self, path: Path, image_dir: Path, answers: dict[str, Any]) -> list[Question]:
        questions: list[Question] = []
        seen: set[str] = set()
        for line, record in read_jsonl(path):
            qid = record_id(record.get("question_id"), file=path, line=line, key="question_id")
            if qid in seen:
                raise BenchmarkError(f"{path}:{line}: question id {qid} appears twice")
            seen.add(qid)
            text = text_field(record, "text", file=path, line=line, record=qid)
            if qid not in answers:
                raise BenchmarkError(
                    f"{path}:{line}: question {qid} has no answer in {self.root / 'answers.jsonl'}"
                )
            image = resolve_inside(self.root, image_dir, record.get("image"), file=path, record=qid)
            questions.append(
                Question(
                    id=qid,
                    prompt=f"{IMAGE_PLACEHOLDER}\n{with_instruction(text, SHORT_ANSWER)}",
                    images=(image,),
                    reference=answers[qid],
                    meta={"kind": self.kind},
                )
            )
        if not questions:
            raise BenchmarkError(f"{path}: no questions")
        return questions

    def questions(self) -> list[Question]:
        """Every question, in the order of ``questions.jsonl``."""
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """``accuracy``: the mean per-question VQA accuracy (or GQA exact match), in percent."""
        check_predictions(self.name, self._questions, predictions)
        per_question = [self._scorer(predictions[q.id].prediction, q.reference) for q in self._questions]
        return {"accuracy": vqa_scoring.benchmark_accuracy(per_question)}
