"""Open-ended VQA scoring: VQA v2 / TextVQA answer normalisation and accuracy, GQA exact match.

Sources the rules follow (facts re-implemented here, not copied):

- VQA v2: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA at its last
  revision (a013f00, "Fixed processing answers bug", 2021): ``processPunctuation``,
  ``processDigitArticle`` and the leave-one-out accuracy in ``evaluate``.
- TextVQA (and LLaVA's VQA v2 submission pre-processing): ``EvalAIAnswerProcessor`` and
  ``TextVQAAccuracyEvaluator`` in haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (from MMF),
  used by ``llava/eval/eval_textvqa.py`` and ``scripts/convert_vqav2_for_submission.py``.
- GQA: LLaVA ``scripts/convert_gqa_for_eval.py`` (``text.rstrip('.').lower()``) followed by the
  GQA ``eval.py`` exact comparison ``prediction == gold``.

Normalisation, variant ``"vqa_v2"`` (the official script):

1. newlines and tabs become spaces, surrounding whitespace is stripped;
2. punctuation: each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *deleted* when it
   touches a space somewhere in the answer (``"x "`` or ``" x"``) or when the answer contains a
   digit-comma-digit (``"3,000"``), and is *replaced by a space* otherwise. Apostrophes and colons
   are kept. The decision for every mark is taken on the input text, not the partly edited one;
3. a period not followed by a digit is deleted (``"dogs."`` -> ``"dogs"``, ``"1.5"`` kept). The
   official pattern ``(?!<=\\d)(\\.)(?!\\d)`` was meant as a look-behind but is a look-ahead that
   can never fail at a period, so it is exactly ``\\.(?!\\d)``; its ``sub`` call passes
   ``re.UNICODE`` (= 32) in the *count* position, so at most 32 periods go: kept for fidelity;
4. lower-case, split on whitespace; number words ``none zero one ... ten`` become ``0 0 1 ... 10``;
   the articles ``a an the`` are dropped; contraction words missing their apostrophe are mapped
   through the official table (``dont`` -> ``don't``, ``whats`` -> ``what's``). ``its`` is *not* in
   the table (it is the possessive, not "it is"), and ``it's`` passes through unchanged.

Variant ``"m4c"`` (TextVQA as LLaVA scores it) first lower-cases, deletes every ``,`` and ``?``, and
splits a possessive ``'s`` off its word (``"it's"`` -> ``"it 's"``); then steps 1-4 as above (its
digit-comma test never fires because the commas are already gone).

Accuracy: with the normalised prediction and the n (= 10) normalised human answers, for each of the
n leave-one-out subsets of n - 1 humans take ``min(1, #humans in the subset who gave the prediction
/ 3)``, and average the n values. With k matching humans this is
``(k * min(1, (k - 1) / 3) + (n - k) * min(1, k / 3)) / n``: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9,
k>=4 -> 1.0.

Deliberate deviation: since a013f00 the official script normalises the answers *and the prediction*
only when the 10 human answers (newlines and tabs to spaces, stripped) are not all the same string;
with unanimous humans a raw ``"Yes"`` or ``"two"`` fails against ``"yes"`` / ``"2"``. Published
pipelines never hit that case because they normalise predictions before scoring (LLaVA's submission
converter runs the EvalAI processor), and normalisation is idempotent on the released, already-
normalised answers. So by default the prediction and every human answer are always normalised,
which gives the same numbers as those pipelines; ``normalize_unanimous=False`` gives vqaEval.py's.
The two differ only on unanimous questions whose prediction equals the answer after normalisation
but not before: 1.0 by default, 0.0 in vqaEval.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

VqaVariant = Literal["vqa_v2", "m4c"]

# Marks that are deleted or turned into spaces (official list since 2016; the same list as MMF's).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

_PERIOD = re.compile(r"\.(?!\d)")
# vqaEval.py tests for one comma between digits; MMF's processor for one or more.
_DIGIT_COMMA = {"vqa_v2": re.compile(r"\d,\d"), "m4c": re.compile(r"(?<=\d),+(?=\d)")}
# See module docstring, step 3: the official call removes at most re.UNICODE == 32 periods.
_OFFICIAL_PERIOD_COUNT = 32

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contractions table (identical in vqaEval.py and MMF's processor), as "key=value".
# The official table also lists "Im", "Ive", "Id've" and "I'dve"; they are left out because words
# are lower-cased before the lookup, so those keys can never match. "somebody'd=somebodyd" is
# backwards in the official table and is kept as it is, since it is what the scorer does.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've
whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())

# Humans per question in VQA v2, VizWiz and TextVQA.
VQA_NUM_ANSWERS = 10


def _check_variant(variant: str) -> None:
    if variant not in _DIGIT_COMMA:
        raise ValueError(f"unknown VQA variant {variant!r}; expected 'vqa_v2' or 'm4c'")


def process_punctuation(text: str, variant: VqaVariant = "vqa_v2") -> str:
    """Steps 2-3 of the module docstring: delete or blank punctuation, delete non-decimal periods."""
    _check_variant(variant)
    drop_all = _DIGIT_COMMA[variant].search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # Decided on the input text, as the official loop does, so the order of marks is irrelevant.
        if drop_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Step 4: lower-case, number words to digits, drop articles, restore contractions."""
    words: list[str] = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _clean(text: str) -> str:
    """Step 1 alone: what vqaEval.py does to every answer before it decides whether to normalise."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _m4c_word_tokenize(text: str) -> str:
    # MMF's EvalAIAnswerProcessor.word_tokenize.
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_vqa_answer(text: str, variant: VqaVariant = "vqa_v2") -> str:
    """An answer (prediction or human) in the form the VQA scorers compare; see the module docstring."""
    _check_variant(variant)
    if variant == "m4c":
        text = _m4c_word_tokenize(text)
    return process_digit_article(process_punctuation(_clean(text), variant))


def _normalized_answers(
    human_answers: Iterable[str],
    variant: VqaVariant,
    question_id: object,
    expected_count: int | None,
) -> list[str]:
    answers = list(human_answers)
    if expected_count is not None and len(answers) != expected_count:
        raise ValueError(
            f"question {question_id!r}: expected {expected_count} human answers, got {len(answers)} "
            "(pass expected_count=None to score against however many there are)"
        )
    if not answers:
        raise ValueError(f"question {question_id!r}: no human answers")
    return [normalize_vqa_answer(a, variant) for a in answers]


def vqa_accuracy(
    prediction: str,
    human_answers: Sequence[str],
    *,
    variant: VqaVariant = "vqa_v2",
    question_id: object = None,
    expected_count: int | None = VQA_NUM_ANSWERS,
    normalize_unanimous: bool = True,
) -> float:
    """VQA accuracy of one prediction in [0, 1]: the mean over the leave-one-out subsets of humans.

    ``human_answers`` must hold exactly ``expected_count`` (10) answers, else ValueError naming
    ``question_id``. With ``expected_count=None`` any non-empty number n is accepted and the same
    leave-one-out mean over the n subsets of n - 1 is taken (a single answer therefore scores 0,
    since its only subset is empty). Use ``variant="vqa_v2"`` for VQA v2 / VizWiz and ``"m4c"`` for
    TextVQA as LLaVA reports it. ``normalize_unanimous=False`` (``vqa_v2`` only) is vqaEval.py's rule
    for humans who all gave the same string: compared as they are, not normalised (module docstring).
    """
    if not normalize_unanimous:
        if variant != "vqa_v2":
            raise ValueError(
                "normalize_unanimous=False is vqaEval.py's rule (variant 'vqa_v2'); "
                "m4c (TextVQA) always normalises"
            )
        raw = [_clean(answer) for answer in human_answers]
        if raw and len(set(raw)) == 1 and (expected_count is None or len(raw) == expected_count):
            # vqaEval.py compares the cleaned strings as they are: all humans match or none does.
            return 1.0 if _clean(prediction) == raw[0] else 0.0
    references = _normalized_answers(human_answers, variant, question_id, expected_count)
    predicted = normalize_vqa_answer(prediction, variant)
    subset_scores = []
    for left_out in range(len(references)):
        matches = sum(1 for i, ref in enumerate(references) if i != left_out and ref == predicted)
        subset_scores.append(min(1.0, matches / 3))
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy_simple(
    prediction: str,
    human_answers: Sequence[str],
    *,
    variant: VqaVariant = "vqa_v2",
    question_id: object = None,
    expected_count: int | None = VQA_NUM_ANSWERS,
) -> float:
    """The VQA paper's short form ``min(1, #humans who gave the prediction / 3)``, in [0, 1].

    Not what the official script reports (that is :func:`vqa_accuracy`): it gives 1.0 from 3
    matching humans where the leave-one-out mean gives 0.9. For comparison and debugging only.
    """
    references = _normalized_answers(human_answers, variant, question_id, expected_count)
    predicted = normalize_vqa_answer(prediction, variant)
    return min(1.0, sum(1 for ref in references if ref == predicted) / 3)


def normalize_gqa_answer(text: str) -> str:
    """GQA answer as LLaVA submits it: strip whitespace, then trailing periods, then lower-case.

    The order is LLaVA's (its generations are whitespace-stripped, then ``rstrip('.').lower()``), so
    ``"Yes."`` -> ``"yes"`` while ``"yes ."`` keeps its inner space and will not match; GQA answers
    are single words or short phrases, so nothing more (no article or punctuation removal) is done.
    """
    return text.strip().rstrip(".").lower()


def gqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction equals the gold answer, else 0.0 (GQA ``eval.py`` accuracy).

    The gold answer is only stripped and lower-cased (GQA's are already lower-case words), so this
    equals the official exact comparison on the released data.
    """
    return 1.0 if normalize_gqa_answer(prediction) == answer.strip().lower() else 0.0


def benchmark_accuracy(scores: Iterable[float]) -> float:
    """Mean of per-question scores (each in [0, 1]) as a percentage in [0, 100].

    Raises ValueError for no scores or a score outside [0, 1] (NaN included), which would mean a
    scorer was mixed up with a percentage or a count.
    """
    values = list(scores)
    if not values:
        raise ValueError("no per-question scores to aggregate")
    for i, value in enumerate(values):
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"score #{i} is {value!r}; per-question scores must lie in [0, 1]")
    return 100.0 * sum(values) / len(values)
