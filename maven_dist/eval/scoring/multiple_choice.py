"""Multiple-choice scoring: MMBench circular evaluation, answer extraction, likelihood choice, accuracy.

Sources the rules follow (re-implemented, not copied):

- Circular evaluation: MMBench (Liu et al., 2023, "CircularEval") as run by open-compass/VLMEvalKit
  ``vlmeval/dataset/utils/multiple_choice.py`` (``mcq_circular_eval``: the copies of a question are
  grouped, the group is a hit only if every copy is answered correctly) and LLaVA's
  ``llava/eval/model_vqa_mmbench.py`` (``--all-rounds``: after each round the options move one
  place left, ``options[1:] + options[:1]``, so a question with N options is asked N times).
- Answer extraction: the rule-based "prefetch" of VLMEvalKit ``vlmeval/utils/matching_util.py``
  (``can_infer_option`` then ``can_infer_text``), with the differences listed on
  :func:`extract_choice`. VLMEvalKit asks an LLM judge when the rules fail; here that is ``None``.
- Likelihood choice: SEED-Bench's official ``eval.py`` (AILab-CVC/SEED-Bench) ranks the options by
  the model's loss on each option text and takes the lowest, i.e. the highest log-likelihood.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

OPTION_LETTERS = string.ascii_uppercase


def option_letters(num_options: int) -> str:
    """The letters labelling ``num_options`` options: ``"ABCD"`` for 4."""
    if not 1 <= num_options <= len(OPTION_LETTERS):
        raise ValueError(f"{num_options} options; between 1 and {len(OPTION_LETTERS)} are supported")
    return OPTION_LETTERS[:num_options]


# ----------------------------------------------------------------------------------------- circular


def circular_variants(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """The N circularly shifted copies of a question with N options, as (options, answer letter).

    Copy k lists the options starting from the k-th (``options[k:] + options[:k]``), so copy 0 is
    the original and ``ABCD`` -> ``BCDA`` -> ``CDAB`` -> ``DABC``; the answer letter moves with its
    option: the option at original index i sits at index ``(i - k) mod N`` in copy k.
    """
    letters = option_letters(len(options))
    if len(answer) != 1 or answer not in letters:  # `"" in "ABCD"` is True for a string
        raise ValueError(f"answer {answer!r} is not one of the option letters {letters}")
    original = letters.index(answer)
    n = len(options)
    return [(list(options[k:]) + list(options[:k]), letters[(original - k) % n]) for k in range(n)]


@dataclass(frozen=True)
class RotationPrediction:
    """The model's letter (``None`` when none could be extracted) for one copy of one question."""

    question_id: Hashable
    rotation: int
    predicted: str | None
    answer: str

    @property
    def correct(self) -> bool:
        return self.predicted is not None and self.predicted == self.answer


@dataclass(frozen=True)
class CircularResult:
    """Accuracies in percent: circular over all copies, vanilla over copy 0 only."""

    circular: float
    vanilla: float
    num_questions: int
    per_question: dict[Hashable, bool]  # circular hit per question id


def score_circular(predictions: Iterable[RotationPrediction]) -> CircularResult:
    """MMBench circular and vanilla accuracy from per-copy predictions, grouped by question id.

    Each question's copies must be numbered 0..k-1 with no gap or repeat (ValueError naming the
    question otherwise), so that a lost copy cannot silently turn a miss into a hit. A question is a
    circular hit only if every copy is correct; vanilla accuracy looks at copy 0 alone.
    """
    groups: dict[Hashable, dict[int, RotationPrediction]] = defaultdict(dict)
    for pred in predictions:
        copies = groups[pred.question_id]
        if pred.rotation in copies:
            raise ValueError(f"question {pred.question_id!r}: rotation {pred.rotation} given twice")
        copies[pred.rotation] = pred
    if not groups:
        raise ValueError("no predictions to score")
    per_question: dict[Hashable, bool] = {}
    vanilla_hits = 0
    for question_id, copies in groups.items():
        if sorted(copies) != list(range(len(copies))):
            raise ValueError(
                f"question {question_id!r}: rotations {sorted(copies)} are not 0..{len(copies) - 1}"
            )
        per_question[question_id] = all(p.correct for p in copies.values())
        vanilla_hits += copies[0].correct
    n = len(groups)
    return CircularResult(
        circular=100.0 * sum(per_question.values()) / n,
        vanilla=100.0 * vanilla_hits / n,
        num_questions=n,
        per_question=per_question,
    )


# --------------------------------------------------------------------------------------- extraction

# VLMEvalKit's can_infer_option turns these characters into spaces before looking for a lone letter.
_SEPARATORS = r"\s.()\[\],:;!*#{}"
_LONE_CAPITAL = re.compile(rf"(?<![^{_SEPARATORS}])([A-Z])(?![^{_SEPARATORS}])")
# "answer is B", "Answer: (C)", "the correct option is D", "choice B": keywords in any case, the
# letter in upper case only (a lower-case "a" after "answer is" is nearly always the article).
_ANSWER_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be))?)\s*:?\s*"
    r"(?i:(?:option|choice)\s+)?[(\[]?([A-Z])(?![A-Za-z0-9])"
)
_SENTENCE_END = ".!?\n"
_NON_WORD = re.compile(r"[^\w\s]")


def _is_article(text: str, match: re.Match[str]) -> bool:
    """An "A" opening a sentence and followed by a lower-case word: "A dog sits on the mat"."""
    before = text[: match.start()].rstrip(" \t")
    at_sentence_start = not before or before[-1] in _SENTENCE_END
    return at_sentence_start and re.match(r"[ \t]+[a-z]", text[match.end() :]) is not None


def _lone_letter(text: str, letters: str) -> str | None:
    """The one valid letter standing alone in ``text``; ``None`` for none, several, or an article "A".

    An article-like "A" makes the pass undecided rather than being skipped, so that "A or B" stays
    ambiguous instead of becoming "B"; the option-text pass then gets its chance ("A dog." -> dog).
    """
    found = set()
    for match in _LONE_CAPITAL.finditer(text):
        letter = match.group(1)
        if letter not in letters:
            continue
        if letter == "A" and _is_article(text, match):
            return None
        found.add(letter)
    return found.pop() if len(found) == 1 else None


def _plain(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the form option texts are compared in."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _match_option_text(text: str, options: Sequence[str], letters: str) -> str | None:
    generated = _plain(text)
    plain_options = [_plain(option) for option in options]
    exact = [letters[i] for i, option in enumerate(plain_options) if option and option == generated]
    if exact:
        return exact[0] if len(exact) == 1 else None
    # VLMEvalKit's guard: a generation more than twice as long as all options together is an
    # explanation that may mention several options in passing, not an answer.
    if len(generated) > 2 * sum(len(option) for option in plain_options):
        return None
    padded = f" {generated} "
    contained = [letters[i] for i, option in enumerate(plain_options) if option and f" {option} " in padded]
    return contained[0] if len(contained) == 1 else None


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text generation picks, or ``None`` when it is absent or ambiguous.

    Tried in order, the first that decides wins:

    1. answer phrases ("The answer is B", "Answer: (C)", "correct option is D"): one letter named
       -> it; different letters named -> ``None``;
    2. lone option letters: a capital valid letter standing alone between whitespace or
       ``. ( ) [ ] , : ; ! * # { }`` ("B", "(B)", "B.", "B) red car"). Exactly one distinct letter
       -> it. An "A" that opens a sentence and is followed by a lower-case word may be the article
       ("A dog is ..."), so then this pass does not decide ("A is correct" is not recognised);
    3. option text: the generation equal to exactly one option's text, or (if not more than twice
       as long as all options together) containing exactly one option's text as whole words;
       comparison is lower-cased with punctuation removed. Zero or several -> ``None``.

    Ambiguous therefore means: contradicting answer phrases, or no single lone letter and no single
    option text. Differences from VLMEvalKit: answer phrases are looked for first (VLMEvalKit would
    call "A or B? The answer is B" undecidable), the article rule replaces its verbose-only "A
    might be a quantifier" check, option texts must match whole words ("cat" does not match
    "category"), lower-case letters are never letters (as there), and its refusal strings -> "Z"
    are not modelled.
    """
    letters = option_letters(len(options))
    stripped = text.strip()
    if not stripped:
        return None
    named = {m.group(1) for m in _ANSWER_PHRASE.finditer(stripped) if m.group(1) in letters}
    if named:
        return named.pop() if len(named) == 1 else None
    lone = _lone_letter(stripped, letters)
    if lone is not None:
        return lone
    return _match_option_text(stripped, options, letters)


# --------------------------------------------------------------------------------------- likelihood


def option_log_likelihood(
    token_logprobs: Sequence[float], reduction: Literal["sum", "mean"] = "sum"
) -> float:
    """An option's score from the log-probabilities of its tokens: their sum or their mean.

    The sum favours short options; the mean (per-token, what a mean cross-entropy loss gives) does
    not. Which one a benchmark used must be recorded with its numbers.
    """
    if not token_logprobs:
        raise ValueError("an option with no tokens has no likelihood")
    if reduction == "sum":
        return float(sum(token_logprobs))
    if reduction == "mean":
        return float(sum(token_logprobs)) / len(token_logprobs)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")


def choose_by_likelihood(scores: Sequence[float]) -> int:
    """Index of the highest-scoring option; a tie goes to the lowest index.

    The fixed tie rule keeps results reproducible (SEED-Bench's ``torch.argsort`` leaves ties to the
    sort). ``-inf`` (probability 0) is a valid score; NaN or no scores raise ValueError.
    """
    if not scores:
        raise ValueError("no option scores to choose from")
    best = 0
    for i, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"option {i} has a NaN score")
        if score > scores[best]:
            best = i
    return best


# ---------------------------------------------------------------------------------------- aggregate


def accuracy(hits: Iterable[bool]) -> float:
    """Percentage (0-100) of true values; ValueError when there are none to count."""
    values = list(hits)
    if not values:
        raise ValueError("no predictions to score")
    return 100.0 * sum(bool(v) for v in values) / len(values)
