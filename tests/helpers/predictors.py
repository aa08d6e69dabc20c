"""Test predictors for the evaluation runner: the upper bound of a scorer and what a constant answer scores."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from maven_dist.eval.scoring.multiple_choice import option_letters
from maven_dist.eval.tasks.base import Question


class OraclePredictor:
    """Answers with each question's reference: the upper bound of a scorer (tests, sanity checks)."""

    def generate(self, questions: Sequence[Question]) -> list[str]:
        return [_reference_text(q.reference) for q in questions]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        letters = [option_letters(len(q.options)) for q in questions]
        return [
            tuple(0.0 if ls[k] == q.reference else -1.0 for k in range(len(ls)))
            for q, ls in zip(questions, letters, strict=True)
        ]


class ConstantPredictor:
    """Always the same answer (and the same option index): what the answer distribution alone scores."""

    def __init__(self, answer: str, option: int = 0):
        self.answer, self.option = answer, option

    def generate(self, questions: Sequence[Question]) -> list[str]:
        return [self.answer for _ in questions]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        return [tuple(0.0 if k == self.option else -1.0 for k in range(len(q.options))) for q in questions]


def _reference_text(reference) -> str:
    if isinstance(reference, str):
        return reference
    if isinstance(reference, list | tuple) and reference:
        return Counter(reference).most_common(1)[0][0]
    return str(reference)
