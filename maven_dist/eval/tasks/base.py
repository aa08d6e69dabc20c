"""What every benchmark reader gives the runner, and what the runner gives back.

A :class:`Task` reads one benchmark from a local directory (never the network) into :class:`Question` s
and scores :class:`Prediction` s with the official rules (``maven_dist/eval/scoring``). How a question is
answered is its ``mode``:

* ``generate``: the model writes an answer to ``prompt`` (VQA, MME, multi-image open-ended/cloze, and
  multiple choice answered by letter);
* ``choice``: the model scores each of ``options`` as a continuation of ``prompt`` (log-likelihood) and
  the highest wins (multiple choice answered by option likelihood).

A multiple-choice benchmark asks each question both ways (two Questions with ``mode`` set accordingly and
ids suffixed ``#gen`` / ``#ll``) and reports both. Inputs are untrusted (they come from the internet):
readers only open files under their benchmark root, never follow paths out of it, never run code, and
report bad records (a missing image, a question id twice, a missing answer) as a :class:`BenchmarkError`
naming the file and record, or as counted skips in ``Task.skipped``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Mode = Literal["generate", "choice"]


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used as it is; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class Question:
    id: str
    """Unique within the task (the predictions file is keyed by it)."""
    prompt: str
    """The question as the model sees it; each ``<image>`` marks where one of ``images`` goes."""
    images: tuple[Path, ...] = ()
    """Image files (absolute, inside the benchmark root), in placeholder order."""
    mode: Mode = "generate"
    options: tuple[str, ...] = ()
    """``choice`` mode: the continuations to score (e.g. each option's text)."""
    reference: Any = None
    """What scoring compares with: VQA's human answers, an MME yes/no, an option letter, a reference text."""
    meta: dict = field(default_factory=dict)
    """Anything scoring needs besides: subtask, category, the MMBench rotation and source question, ..."""


@dataclass(frozen=True)
class Prediction:
    question_id: str
    prediction: str
    """The generated text, or (``choice``) the chosen option's letter."""
    scores: tuple[float, ...] = ()
    """``choice`` mode: each option's log-likelihood."""


class Task(Protocol):
    name: str
    """e.g. ``vqav2``, ``mme``, ``mmbench``; metrics are logged as ``eval/<name>/<metric>``."""
    format: str
    """The reader: ``vqa``, ``mme``, ``multiple_choice``, ``multi_image``."""
    skipped: list[str]
    """Records left out while reading, each with its file, record and reason (reported, never silent)."""

    def questions(self) -> list[Question]:
        """Every question of the task, in a stable order."""
        ...

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """Metrics by name (``accuracy``, ``score``, ``perception``, ...); `predictions` by question id cover
        every question (the runner checks). Percentages where the benchmark reports percentages."""
        ...


def first_questions(task: Task, limit: int) -> Task:
    """`task` cut to its first `limit` questions (``maven eval --limit``), scored by its own rules over those
    only. Every reader keeps its questions in ``_questions``; a copy with that list cut is the same reader
    over fewer questions (MMBench's circular groups may be cut short at the end)."""
    subset = copy.copy(task)
    subset._questions = task.questions()[:limit]
    return subset
