"""MME scoring: yes/no parsing, per-subtask accuracy and accuracy+, perception and cognition totals.

Rules follow MME's official ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-Language-
Models, ``tools/eval_tool.zip``), which lmms-eval's ``lmms_eval/tasks/mme/utils.py`` reproduces:

- a prediction is lower-cased; exactly ``"yes"`` / ``"no"`` is itself; otherwise it is ``"yes"`` if
  its first four characters contain ``yes``, else ``"no"`` if they contain ``no``, else
  ``"other"`` (which is never correct). Only the first four characters count, so ``"No, there is
  a dog"`` -> no, ``"There is no dog"`` -> other, and, as in the official rule, ``"not sure"`` and
  ``"nope"`` -> no and ``"eyes"`` -> yes. Surrounding whitespace is stripped first (the official
  script reads whitespace-stripped generations, e.g. LLaVA's ``outputs.strip()``); lmms-eval's
  extra rules (dropping periods, ``"y"``/``"n"``) are *not* applied, to keep the official scores;
- the ground truth is ``Yes`` or ``No`` (any case);
- per subtask: acc = correct questions / questions; acc+ = images whose two questions are both
  correct / images; score = 100 * acc + 100 * acc+ (at most 200);
- perception = sum of the 10 perception subtask scores (at most 2000); cognition = sum of the 4
  cognition subtask scores (at most 800).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

PERCEPTION_SUBTASKS: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION_SUBTASKS: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
ALL_SUBTASKS: tuple[str, ...] = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS

# MME asks exactly two questions per image (one answered yes, one no).
QUESTIONS_PER_IMAGE = 2

YesNo = Literal["yes", "no", "other"]


def parse_yes_no(prediction: str) -> YesNo:
    """Map a free-text prediction to ``"yes"``, ``"no"`` or ``"other"`` by the official MME rule."""
    # The official exact "yes"/"no" test is subsumed by the prefix test, so only the latter is coded.
    prefix = prediction.strip().lower()[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class MmeRecord:
    """One MME question: its subtask, its image, the model's raw text and the gold ``Yes``/``No``."""

    subtask: str
    image_id: str
    prediction: str
    answer: str


@dataclass(frozen=True)
class SubtaskScore:
    """acc and acc+ in [0, 1]; score = 100 * (acc + acc_plus) in [0, 200]."""

    subtask: str
    acc: float
    acc_plus: float
    num_images: int
    num_other: int  # predictions that parsed to neither yes nor no

    @property
    def score(self) -> float:
        return 100.0 * self.acc + 100.0 * self.acc_plus


@dataclass(frozen=True)
class MmeResult:
    """Per-subtask scores and the two MME totals (sums of subtask scores over the present subtasks)."""

    subtasks: dict[str, SubtaskScore]
    perception: float
    cognition: float


def _gold(record: MmeRecord) -> Literal["yes", "no"]:
    gold = record.answer.strip().lower()
    if gold not in ("yes", "no"):
        raise ValueError(
            f"MME {record.subtask} image {record.image_id!r}: gold answer {record.answer!r} is not Yes/No"
        )
    return "yes" if gold == "yes" else "no"


def score_subtask(subtask: str, records: Iterable[MmeRecord]) -> SubtaskScore:
    """acc, acc+ and score of one subtask from its questions (in any order).

    Raises ValueError for an unknown subtask, a record of another subtask, a gold answer that is not
    yes/no, an image with other than two questions, or no records at all.
    """
    if subtask not in ALL_SUBTASKS:
        raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {', '.join(ALL_SUBTASKS)}")
    per_image: dict[str, list[bool]] = defaultdict(list)
    num_other = 0
    for record in records:
        if record.subtask != subtask:
            raise ValueError(
                f"MME image {record.image_id!r}: record of subtask {record.subtask!r} given to {subtask!r}"
            )
        predicted = parse_yes_no(record.prediction)
        num_other += predicted == "other"
        per_image[record.image_id].append(predicted == _gold(record))
    if not per_image:
        raise ValueError(f"MME subtask {subtask!r}: no records")
    for image_id, hits in per_image.items():
        if len(hits) != QUESTIONS_PER_IMAGE:
            raise ValueError(
                f"MME {subtask} image {image_id!r}: {len(hits)} questions, expected {QUESTIONS_PER_IMAGE}"
            )
    num_questions = sum(len(hits) for hits in per_image.values())
    correct = sum(sum(hits) for hits in per_image.values())
    both_correct = sum(all(hits) for hits in per_image.values())
    return SubtaskScore(
        subtask=subtask,
        acc=correct / num_questions,
        acc_plus=both_correct / len(per_image),
        num_images=len(per_image),
        num_other=num_other,
    )


def score_mme(records: Iterable[MmeRecord], *, allow_missing: bool = False) -> MmeResult:
    """Score every subtask present and sum them into the perception and cognition totals.

    By default all 14 subtasks must be present (a total over fewer is not comparable with published
    MME numbers); ``allow_missing=True`` sums whichever are present.
    """
    by_subtask: dict[str, list[MmeRecord]] = defaultdict(list)
    for record in records:
        if record.subtask not in ALL_SUBTASKS:
            raise ValueError(
                f"MME image {record.image_id!r}: unknown subtask {record.subtask!r}; "
                f"expected one of {', '.join(ALL_SUBTASKS)}"
            )
        by_subtask[record.subtask].append(record)
    missing = [name for name in ALL_SUBTASKS if name not in by_subtask]
    if missing and not allow_missing:
        raise ValueError(
            f"MME subtasks missing: {', '.join(missing)} (pass allow_missing=True to sum the rest)"
        )
    scores = {name: score_subtask(name, by_subtask[name]) for name in ALL_SUBTASKS if name in by_subtask}
    return MmeResult(
        subtasks=scores,
        perception=sum(s.score for name, s in scores.items() if name in PERCEPTION_SUBTASKS),
        cognition=sum(s.score for name, s in scores.items() if name in COGNITION_SUBTASKS),
    )
