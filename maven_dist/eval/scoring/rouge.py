"""ROUGE-L and the accuracy rules of DEMONBench's open-ended and multiple-choice tasks.

DEMONBench's official ``DEMON Benchmark/scripts/evaluate.py`` (DCDmllm/Cheetah) is the source:

- text normalisation (``Eval.process``): newlines/tabs to spaces, strip, the VQA punctuation rule
  (see ``vqa.process_punctuation``: marks deleted or blanked, non-decimal periods deleted), strip
  surrounding ``'`` and ``"``, strip, lower-case. Tokens are the whitespace-separated words of that;
- open-ended tasks: ``Rouge().get_scores(pred, gt)[0]['rouge-l']['f']`` from the ``rouge`` package
  pinned at 1.0.1 in Cheetah's requirements (pltrdy/rouge), averaged over samples; an empty
  normalised prediction scores 0. That F is the plain F1 (beta = 1), ``2PR / (P + R)``, not the
  COCO caption evaluator's beta = 1.2 -- so beta = 1 is the default here;
- multiple-choice tasks: the normalised prediction is matched to the most TF-IDF-cosine-similar
  normalised choice (scikit-learn ``TfidfVectorizer`` defaults), correct if that is the gold one;
- the image-choice tasks (``image_choice_dataset_list``: RecipeQA_VisualCloze,
  RecipeQA_ImageCoherence, COMICS_Panel, whose answers are "Image A" ... "Image D") are scored by
  ``Eval.evaluate_multi_choice_image`` instead: the first 7 characters of the normalised prediction
  and gold must be equal, and a prediction naming several of "image a" ... "image d" scores 0. TF-IDF
  could not score them: it drops one-letter words, so the four choices are one vector and every
  prediction would go to "Image A".

``rouge`` 1.0.1's ROUGE-L is not the textbook sentence-level one: it splits both texts into
"sentences" at every remaining period, and with its default ``exclusive=True`` it counts *distinct*
words -- the hypothesis and reference lengths are their vocabulary sizes and the overlap is the
number of distinct words in the union of the per-sentence-pair LCSs. With repeated words ("the")
this differs a lot from the textbook value, so both are provided: :func:`demon_rouge_l` reproduces
DEMONBench numbers, :func:`rouge_l` is Lin (2004)'s sentence-level ROUGE-L on the same tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from maven_dist.eval.scoring.vqa import process_punctuation

# scikit-learn TfidfVectorizer's default token_pattern (words of two or more word characters).
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")

# DEMON evaluate.py, ``image_choice_dataset_list``: the datasets scored by evaluate_multi_choice_image.
# The list spells the first "recipeqa-RecipeQA_VisualCloze" while its run script (i4_scripts.sh)
# passes "RecipeQA_VisualCloze", which would then miss the rule it was listed for; both are accepted.
DEMON_IMAGE_CHOICE_TASKS: tuple[str, ...] = (
    "RecipeQA_VisualCloze",
    "RecipeQA_ImageCoherence",
    "COMICS_Panel",
)
_IMAGE_CHOICE_ALIASES: tuple[str, ...] = ("recipeqa-RecipeQA_VisualCloze",)
# evaluate_multi_choice_image: the image names it counts in a prediction (always these four).
DEMON_IMAGE_NAMES: tuple[str, ...] = ("image a", "image b", "image c", "image d")
# ... and how many leading characters of prediction and gold it compares: len("image a").
_IMAGE_PREFIX_CHARS = 7
_IMAGE_ANSWER = re.compile(r"image [a-z]")


def normalize_demon_text(text: str) -> str:
    """DEMONBench's ``Eval.process``: VQA punctuation rule, surrounding quotes stripped, lower-case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # DEMON's punctuation list and regexes are those of the VQA v2 script.
    text = process_punctuation(text, "vqa_v2")
    return text.strip("'").strip('"').strip().lower()


def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    """``table[i][j]`` = LCS length of ``x[:i]`` and ``y[:j]``."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table


def lcs_length(x: Sequence[str], y: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    return _lcs_table(x, y)[len(x)][len(y)]


def _f_measure(precision: float, recall: float, beta: float) -> float:
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(prediction: str, reference: str, *, beta: float = 1.0) -> float:
    """Sentence-level ROUGE-L F-measure (Lin, 2004) in [0, 1] on DEMON-normalised whitespace tokens.

    P = LCS / prediction tokens, R = LCS / reference tokens, F = (1 + b^2) P R / (R + b^2 P).
    ``beta=1`` (default) is DEMONBench's F1; ``beta=1.2`` is the COCO caption evaluator's weighting
    (which for several references takes the best P and best R separately; one reference here).
    An empty prediction or reference scores 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    hyp = normalize_demon_text(prediction).split()
    ref = normalize_demon_text(reference).split()
    if not hyp or not ref:
        return 0.0
    lcs = lcs_length(hyp, ref)
    return _f_measure(lcs / len(hyp), lcs / len(ref), beta)


def _rouge_sentences(text: str) -> list[list[str]]:
    # rouge 1.0.1: split at ".", keep non-empty pieces, squeeze whitespace, words = split(" ").
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: Sequence[str], hypothesis: Sequence[str]) -> set[str]:
    """Distinct words on the LCS path that rouge 1.0.1's ``_recon_lcs`` walks back.

    From the end: equal tokens are taken diagonally; otherwise the walk goes up (drops a reference
    token) only when that keeps a strictly longer LCS than going left. The path matters because
    with repeated words two LCSs of equal length can have different sets of distinct words.
    """
    table = _lcs_table(reference, hypothesis)
    words: set[str] = set()
    i, j = len(reference), len(hypothesis)
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def demon_rouge_l(prediction: str, reference: str) -> float:
    """DEMONBench's per-sample ROUGE-L F in [0, 1], as ``evaluate.py`` with ``rouge`` 1.0.1 computes it.

    Both texts are normalised with :func:`normalize_demon_text`; an empty prediction scores 0 and an
    empty reference raises ValueError (DEMON asserts it is non-empty). Then, over the period-split
    sentences: m / n = distinct reference / prediction words, overlap = distinct words in the union
    of the LCSs of every (reference sentence, prediction sentence) pair, R = overlap / m,
    P = overlap / n, F = 2PR / (P + R). (The package adds 1e-8 to that denominator; left out, it
    changes F by less than 1e-8.)
    """
    ref_text = normalize_demon_text(reference)
    hyp_text = normalize_demon_text(prediction)
    if not ref_text:
        raise ValueError(f"reference {reference!r} is empty after normalisation")
    ref_sentences = _rouge_sentences(ref_text)
    hyp_sentences = _rouge_sentences(hyp_text)
    if not hyp_sentences:
        return 0.0
    union: set[str] = set()
    for ref_sentence in ref_sentences:
        for hyp_sentence in hyp_sentences:
            union |= _lcs_words(ref_sentence, hyp_sentence)
    m = len({word for sentence in ref_sentences for word in sentence})
    n = len({word for sentence in hyp_sentences for word in sentence})
    return _f_measure(len(union) / n, len(union) / m, beta=1.0)


def cloze_exact_match(prediction: str, answer: str) -> float:
    """1.0 if prediction and answer are equal after :func:`normalize_demon_text`, else 0.0."""
    return 1.0 if normalize_demon_text(prediction) == normalize_demon_text(answer) else 0.0


def is_demon_image_choice_task(name: str) -> bool:
    """Whether DEMON scores the task ``name`` (any case) with :func:`demon_image_choice_match`."""
    return name.lower() in {task.lower() for task in DEMON_IMAGE_CHOICE_TASKS + _IMAGE_CHOICE_ALIASES}


def is_demon_image_answer(answer: str) -> bool:
    """Whether a gold answer starts, once normalised, with an image name ("Image B", "image c: ...")."""
    return _IMAGE_ANSWER.fullmatch(normalize_demon_text(answer)[:_IMAGE_PREFIX_CHARS]) is not None


def demon_image_choice_match(prediction: str, answer: str) -> float:
    """DEMON's image-choice hit (``Eval.evaluate_multi_choice_image``): 1.0 or 0.0.

    Both texts are normalised (:func:`normalize_demon_text`); the hit is their first 7 characters
    being equal ("Image B: the bowl" and "image bravo" both match "Image B"), unless the prediction
    names more than one of :data:`DEMON_IMAGE_NAMES` ("Image B, not Image C" scores 0). Choices are
    not consulted, as in the official rule.
    """
    pred = normalize_demon_text(prediction)
    gold = normalize_demon_text(answer)
    if sum(name in pred for name in DEMON_IMAGE_NAMES) > 1:
        return 0.0
    return 1.0 if pred[:_IMAGE_PREFIX_CHARS] == gold[:_IMAGE_PREFIX_CHARS] else 0.0


def _tfidf_direction(text: str) -> frozenset[tuple[str, float]]:
    counts = Counter(_TFIDF_TOKEN.findall(normalize_demon_text(text)))
    total = sum(counts.values())
    return frozenset((term, count / total) for term, count in counts.items())


def demon_choices_distinguishable(choices: Sequence[str]) -> bool:
    """Whether :func:`demon_choice_match` can pick another choice than the first.

    False when every choice has the same, non-empty TF-IDF direction (the same words of 2+
    characters, in proportional counts): the cosines then tie for any prediction and the first
    choice always wins. "Image A" ... "Image D" are such choices (one-letter words are not terms).
    Choices without any term ("A", "B") count as distinguishable: a prediction without one is then
    compared exactly (DEMON's fallback when scikit-learn finds no vocabulary).
    """
    directions = {_tfidf_direction(choice) for choice in choices}
    return len(directions) > 1 or directions == {frozenset()}


def _tfidf_vectors(texts: Sequence[str]) -> list[dict[str, float]] | None:
    """L2-normalised TF-IDF vectors with scikit-learn's defaults; ``None`` for an empty vocabulary.

    Defaults reproduced: lower-case, tokens of 2+ word characters, raw counts, smooth idf
    ``ln((1 + N) / (1 + df)) + 1``, l2 norm.
    """
    counts = [Counter(_TFIDF_TOKEN.findall(text.lower())) for text in texts]
    document_frequency = Counter(term for c in counts for term in c)
    if not document_frequency:
        return None
    num_docs = len(texts)
    idf = {term: math.log((1 + num_docs) / (1 + df)) + 1 for term, df in document_frequency.items()}
    vectors = []
    for c in counts:
        weights = {term: tf * idf[term] for term, tf in c.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        vectors.append({term: w / norm for term, w in weights.items()} if norm else {})
    return vectors


def demon_choice_match(prediction: str, choices: Sequence[str], answer: str) -> float:
    """DEMONBench's multiple-choice hit: 1.0 if the choice most TF-IDF-similar to the prediction is gold.

    All texts are normalised first; the gold answer must be one of the choices (ValueError
    otherwise). Cosine similarity of the prediction to each choice, the first maximum wins (numpy's
    argmax); a prediction sharing no term with any choice therefore picks the first choice. When no
    text has a 2+ character word (scikit-learn raises, DEMON falls back), it is exact match.
    """
    if not choices:
        raise ValueError("no choices given")
    pred = normalize_demon_text(prediction)
    gold = normalize_demon_text(answer)
    options = [normalize_demon_text(choice) for choice in choices]
    if gold not in options:
        raise ValueError(f"gold answer {answer!r} is not among the choices {list(choices)!r}")
    vectors = _tfidf_vectors([pred, *options])
    if vectors is None:
        return 1.0 if pred == gold else 0.0
    query, *candidates = vectors
    similarities = [sum(w * c.get(term, 0.0) for term, w in query.items()) for c in candidates]
    best = max(range(len(options)), key=lambda i: (similarities[i], -i))
    return 1.0 if options[best] == gold else 0.0
