"""Multiple-choice scoring: MMBench circular evaluation, answer extraction, likelihood choice, accuracy.

Sources the rules follow (re-implemented, not copied):

- Circular evaluation: MMBench (Liu et al., 2023, "CircularEval") as run by open-compass/VLMEvalKit
  ``vlmeval/dataset/utils/multiple_choice.py`` (``mcq_circular_eval``: the copies of a question are
  grouped, the group is a hit only if every copy is answered correctly) and LLaVA's
  ``llava/eval/model_vqa_mmbench.py`` (``--all-rounds``: after each round the options move one
  place left, ``options[1:] + options[:1]``, so a question with N options is asked N times).
- Answer extraction: the rule-based matching of VLMEvalKit ``vlmeval/utils/matching_util.py``
  (``can_infer``: ``can_infer_option``, its "answer is" pattern, ``can_infer_text``), with the two
  differences listed on :func:`extract_choice`. VLMEvalKit asks an LLM judge when the rules fail;
  here that is ``None``, a miss, as in VLMEvalKit's ``exact_matching`` mode.
- SEED-Bench by generation: LLaVA's ``scripts/convert_seed_for_submission.py`` (exact letter).
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
# The rules of VLMEvalKit's ``can_infer`` (vlmeval/utils/matching_util.py, as of e8e78f05, 2026-08).

# can_infer_option turns these characters into spaces and splits the answer into tokens there.
_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
# It takes the one option letter among the tokens only if the letter first appears among the last
# four (``splits.index(ch) > len(splits) - 5``): earlier, a capital is more often a word of an
# explanation ("B is wrong because ...", "A dog is ...") than the answer, and its judge decides.
_LAST_TOKENS = 4
# Refusals it reads as "Z" (none of the options) before trying anything else.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# Its _VERBOSE_ANSWER_RE (VLMEvalKit #1552), any case: "answer is B", "correct answer is **c**". Here
# the letter must also end there (VLMEvalKit reads "answer is clearly ..." as C); see _verbose_answer
# for the article "a".
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**(?![A-Za-z0-9])")
_WORD_FOLLOWS = re.compile(r"\s+[A-Za-z]")
_NON_WORD = re.compile(r"[^\w\s]")


def _verbose_answer(answer: str, letters: str) -> str | None:
    """The letter of the first "answer is <letter>" in ``answer``, ``None`` when absent or not offered.

    A lower-case "a" followed by a word is the article ("the answer is a dog"), not option A, and is
    passed over (VLMEvalKit takes it).
    """
    for match in _VERBOSE_ANSWER.finditer(answer):
        letter = match.group(1)
        if letter == "a" and _WORD_FOLLOWS.match(answer, match.end()):
            continue
        return letter.upper() if letter.upper() in letters else None
    return None


def _plain(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the form option texts are compared in."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _match_option_text(answer: str, options: Sequence[str], letters: str) -> str | None:
    # can_infer_text: an answer more than twice as long as all options together is an explanation
    # that may mention several options in passing, not an answer.
    if len(answer) > 2 * sum(len(option) for option in options):
        return None
    generated = _plain(answer)
    plain_options = [_plain(option) for option in options]
    exact = [letters[i] for i, option in enumerate(plain_options) if option and option == generated]
    if exact:
        return exact[0] if len(exact) == 1 else None
    padded = f" {generated} "
    contained = [letters[i] for i, option in enumerate(plain_options) if option and f" {option} " in padded]
    return contained[0] if len(contained) == 1 else None


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text generation picks, or ``None`` when it names none or several.

    VLMEvalKit's rule-based matching (``can_infer``) without its LLM judge, which is what its
    ``exact_matching`` mode scores (``None`` here is its "Z", a miss). On the stripped text, in order:

    1. one of VLMEvalKit's refusals ("Cannot determine the answer", ...) -> ``None``;
    2. option letters: ``. ( ) [ ] , : ; ! * # { }`` become spaces and the text is split into
       tokens. Exactly one option letter (upper case) among them, first seen among the last four
       tokens -> it: "B", "(B)", "Answer: (C)", "I think it is B", "A dog." (-> A), but not
       "B is the correct answer here". No option letter but a token "Z" -> ``None``;
    3. the first "answer is <letter>" / "correct answer is **<letter>**", in any case -> its letter
       when offered: "A or B? The answer is B." -> B, "The answer is b" -> B;
    4. option text, unless the text is more than twice as long as all options together: the text
       equal to exactly one option's text, else containing exactly one as whole words (lower-cased,
       punctuation removed) -> its letter.

    Deliberate differences from VLMEvalKit (docs/evaluation.md, "MMBench"): in 3 the letter must not
    run on into a word, and a lower-case "a" followed by a word is the article (VLMEvalKit reads "The
    answer is clearly dog" as C and "The answer is a dog" as A); in 4 options match as whole words
    and a text equal to one option picks it (VLMEvalKit finds "cat" in "category", and "red car"
    names both "red" and "red car" there).
    """
    letters = option_letters(len(options))
    answer = text.strip()
    if not answer or any(refusal in answer for refusal in _REFUSALS):
        return None
    tokens = _SEPARATORS.sub(" ", answer).split()
    named = [letter for letter in letters if letter in tokens]
    if len(named) == 1:
        if tokens.index(named[0]) >= len(tokens) - _LAST_TOKENS:
            return named[0]
    elif not named and "Z" in tokens:
        return None
    return _verbose_answer(answer, letters) or _match_option_text(answer, options, letters)


def llava_letter_match(text: str, answer: str) -> bool:
    """SEED-Bench as LLaVA-1.5 scores it: the generation, stripped, is exactly the answer letter.

    LLaVA's ``scripts/convert_seed_for_submission.py`` counts ``row['text'] == answer`` on the
    outputs of ``model_vqa_loader.py``, which strips them: "B" is right, "B." and "(B)" are not.
    """
    return text.strip() == answer


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
