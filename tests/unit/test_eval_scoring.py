"""Benchmark scoring rules against cases worked out by hand from the official scripts' rules."""

from __future__ import annotations

import math

import pytest

from maven_dist.eval.scoring import mme, multiple_choice, rouge, vqa

# ------------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # final period deleted, number word -> digit
        ("2 dogs", "2 dogs"),
        ("\tYes\n", "yes"),
        ("yes!", "yes"),  # "!" touches no space: blanked, then whitespace collapses
        ("3,000", "3000"),  # digit-comma-digit: every mark deleted, not blanked
        ("1.5", "1.5"),  # a period before a digit is a decimal point and stays
        ("1.", "1"),
        ("Mr. Smith", "mr smith"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("dont", "don't"),  # contraction missing its apostrophe restored
        ("whats up", "what's up"),
        ("its", "its"),  # the possessive: not in the contractions table
        ("it's", "it's"),  # apostrophes are not punctuation in the current official list
        ("red/blue", "red blue"),
        ("red,blue", "red blue"),
        # One "-" touches a space, so every "-" in the answer is deleted, also the one inside a word.
        ("t-shirt - red", "tshirt red"),
        ("t-shirt red", "t shirt red"),
        ("3,000 t-shirts", "3000 tshirts"),
    ],
)
def test_vqa_v2_normalisation(raw: str, expected: str) -> None:
    assert vqa.normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("it's", "it 's"),  # MMF splits the possessive off
        ("red,blue", "redblue"),  # MMF deletes every comma up front (vqa_v2 would blank it)
        ("Two dogs.", "2 dogs"),
        ("dont", "don't"),
    ],
)
def test_m4c_normalisation(raw: str, expected: str) -> None:
    assert vqa.normalize_vqa_answer(raw, "m4c") == expected


def test_unknown_vqa_variant() -> None:
    with pytest.raises(ValueError, match="unknown VQA variant"):
        vqa.normalize_vqa_answer("yes", "vqa_v3")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- VQA accuracy

OTHERS = ["3", "4", "5", "6", "7", "8", "9", "many"]


def test_vqa_accuracy_two_matching_humans() -> None:
    # Prediction "Two." normalises to "2"; humans: two said "2", eight said something else.
    # Leave-one-out over the 10 humans:
    #   drop one of the 2 matching humans (2 subsets): 1 match left  -> min(1, 1/3) = 1/3
    #   drop one of the 8 others           (8 subsets): 2 matches    -> min(1, 2/3) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    answers = ["2", "two"] + OTHERS
    assert vqa.vqa_accuracy("Two.", answers) == pytest.approx(0.6)
    # The short form min(1, 2/3) would say 0.667: the two rules really differ.
    assert vqa.vqa_accuracy_simple("Two.", answers) == pytest.approx(2 / 3)


def test_vqa_accuracy_three_and_four_matching_humans() -> None:
    # 3 matches: (3 * min(1, 2/3) + 7 * min(1, 3/3)) / 10 = (2 + 7) / 10 = 0.9 -- not 1.0.
    three = ["yes"] * 3 + OTHERS[:7]
    assert vqa.vqa_accuracy("Yes", three) == pytest.approx(0.9)
    assert vqa.vqa_accuracy_simple("Yes", three) == 1.0
    # 4 matches: every subset keeps at least 3 -> (4 * 1 + 6 * 1) / 10 = 1.0.
    four = ["yes"] * 4 + OTHERS[:6]
    assert vqa.vqa_accuracy("Yes", four) == 1.0
    # Unanimous humans and a prediction that only matches after normalisation: still 1.0.
    assert vqa.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_one_and_zero_matches() -> None:
    # 1 match: (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10 = 3 / 10 = 0.3.
    assert vqa.vqa_accuracy("cat", ["cat"] + OTHERS + ["dog"]) == pytest.approx(0.3)
    assert vqa.vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_vqa_accuracy_unanimous_humans() -> None:
    # vqaEval.py (a013f00) normalises the answers and the prediction only when the 10 human answers
    # (newlines and tabs to spaces, stripped) are not all the same string; here always, by default.
    assert vqa.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa.vqa_accuracy("Two", ["2"] * 10, normalize_unanimous=False) == 0.0
    assert vqa.vqa_accuracy("Yes.", ["yes"] * 10, normalize_unanimous=False) == 0.0
    assert vqa.vqa_accuracy(" yes\n", ["yes"] * 10, normalize_unanimous=False) == 1.0
    # Nine "2" and one "3" are not unanimous: both rules normalise, "Two" -> "2" -> 1.0.
    assert vqa.vqa_accuracy("Two", ["2"] * 9 + ["3"], normalize_unanimous=False) == 1.0
    with pytest.raises(ValueError, match="m4c"):
        vqa.vqa_accuracy("2", ["2"] * 10, variant="m4c", normalize_unanimous=False)


def test_vqa_accuracy_answer_count() -> None:
    with pytest.raises(ValueError, match=r"question 'q7'.*expected 10 human answers, got 9"):
        vqa.vqa_accuracy("2", ["2"] * 9, question_id="q7")
    # Any count when asked for: 2 of 5 match -> (2 * 1/3 + 3 * 2/3) / 5 = (8/3) / 5 = 8/15.
    assert vqa.vqa_accuracy("2", ["2", "2", "3", "4", "5"], expected_count=None) == pytest.approx(8 / 15)
    with pytest.raises(ValueError, match="no human answers"):
        vqa.vqa_accuracy("2", [], expected_count=None)


def test_gqa_exact_match() -> None:
    assert vqa.gqa_exact_match("Yes.", "yes") == 1.0
    assert vqa.gqa_exact_match(" Table. ", "table") == 1.0
    assert vqa.gqa_exact_match("the table", "table") == 0.0  # no article removal in GQA
    assert vqa.gqa_exact_match("yes .", "yes") == 0.0  # LLaVA's order: strip, then rstrip('.')
    assert vqa.gqa_exact_match("chairs", "chair") == 0.0


def test_benchmark_accuracy() -> None:
    # (1 + 0 + 0.6 + 0.9) / 4 = 2.5 / 4 = 0.625 -> 62.5 %
    assert vqa.benchmark_accuracy([1.0, 0.0, 0.6, 0.9]) == pytest.approx(62.5)
    for bad in ([], [1.5], [math.nan], [-0.1]):
        with pytest.raises(ValueError):
            vqa.benchmark_accuracy(bad)


# ------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("  Yes  ", "yes"),
        ("No.", "no"),
        ("NO", "no"),
        ("There is no dog.", "other"),  # only the first four characters count
        ("I think yes", "other"),
        ("not sure", "no"),  # "not " contains "no": the official rule's quirk
        ("eyes", "yes"),  # likewise
        ("", "other"),
    ],
)
def test_mme_parse(text: str, label: str) -> None:
    assert mme.parse_yes_no(text) == label


def _rec(subtask: str, image: str, prediction: str, answer: str) -> mme.MmeRecord:
    return mme.MmeRecord(subtask=subtask, image_id=image, prediction=prediction, answer=answer)


EXISTENCE = [
    # image 1: both right -> counts for acc+
    _rec("existence", "img1", "Yes", "Yes"),
    _rec("existence", "img1", "No, there is none.", "No"),
    # image 2: second question wrong -> no acc+
    _rec("existence", "img2", "Yes", "Yes"),
    _rec("existence", "img2", "Yes", "No"),
]


def test_mme_subtask_score() -> None:
    # acc = 3 right / 4 questions = 0.75; acc+ = 1 image of 2 = 0.5; score = 75 + 50 = 125.
    score = mme.score_subtask("existence", EXISTENCE)
    assert (score.acc, score.acc_plus, score.num_images) == (0.75, 0.5, 2)
    assert score.score == pytest.approx(125.0)
    # An unparsable answer is wrong: acc = 1/2, acc+ = 0 -> 50; and it is counted as "other".
    count = mme.score_subtask(
        "count", [_rec("count", "c1", "There are two.", "Yes"), _rec("count", "c1", "no", "No")]
    )
    assert (count.score, count.num_other) == (pytest.approx(50.0), 1)


def _perfect(subtask: str) -> list[mme.MmeRecord]:
    return [_rec(subtask, "i", "yes", "Yes"), _rec(subtask, "i", "no", "No")]


def test_mme_totals() -> None:
    records = [r for name in mme.ALL_SUBTASKS if name != "existence" for r in _perfect(name)] + EXISTENCE
    result = mme.score_mme(records)
    # Perception: existence 125 + 9 perfect subtasks * 200 = 1925; cognition: 4 * 200 = 800.
    assert result.perception == pytest.approx(1925.0)
    assert result.cognition == pytest.approx(800.0)
    assert len(mme.PERCEPTION_SUBTASKS) == 10 and len(mme.COGNITION_SUBTASKS) == 4
    assert result.subtasks["existence"].score == pytest.approx(125.0)


def test_mme_bad_input() -> None:
    with pytest.raises(ValueError, match=r"image 'img1': 3 questions, expected 2"):
        mme.score_subtask("existence", [*EXISTENCE, _rec("existence", "img1", "yes", "Yes")])
    with pytest.raises(ValueError, match=r"image 'img9': 1 questions"):
        mme.score_subtask("existence", [_rec("existence", "img9", "yes", "Yes")])
    with pytest.raises(ValueError, match="unknown MME subtask 'colour'"):
        mme.score_subtask("colour", [])
    with pytest.raises(ValueError, match="unknown subtask 'colour'"):
        mme.score_mme([_rec("colour", "x", "yes", "Yes")])
    with pytest.raises(ValueError, match=r"image 'img1'.*not Yes/No"):
        mme.score_subtask("existence", [_rec("existence", "img1", "yes", "maybe")])
    with pytest.raises(ValueError, match="subtasks missing: count"):
        mme.score_mme(EXISTENCE)
    partial = mme.score_mme(EXISTENCE + _perfect("OCR"), allow_missing=True)
    assert (partial.perception, partial.cognition) == (pytest.approx(325.0), 0.0)


# --------------------------------------------------------------------------------- MMBench circular

ANIMALS = ["cat", "dog", "bird", "fish"]


def test_circular_variants() -> None:
    # "dog" is B; each copy starts one option later, and dog's letter follows it.
    assert multiple_choice.circular_variants(ANIMALS, "B") == [
        (["cat", "dog", "bird", "fish"], "B"),
        (["dog", "bird", "fish", "cat"], "A"),
        (["bird", "fish", "cat", "dog"], "D"),
        (["fish", "cat", "dog", "bird"], "C"),
    ]
    with pytest.raises(ValueError, match="'E' is not one of the option letters ABCD"):
        multiple_choice.circular_variants(ANIMALS, "E")
    for bad in ("", "AB"):  # substrings of "ABCD" are not letters
        with pytest.raises(ValueError, match="is not one of the option letters"):
            multiple_choice.circular_variants(ANIMALS, bad)


def test_circular_accuracy_fails_where_vanilla_passes() -> None:
    preds = []
    # q1: the model finds "dog" in every copy.
    for k, (_, answer) in enumerate(multiple_choice.circular_variants(ANIMALS, "B")):
        preds.append(multiple_choice.RotationPrediction("q1", k, answer, answer))
    # q2: the answer is A and the model always says "A" -- right in copy 0 only (position bias).
    for k, (_, answer) in enumerate(multiple_choice.circular_variants(ANIMALS, "A")):
        preds.append(multiple_choice.RotationPrediction("q2", k, "A", answer))
    result = multiple_choice.score_circular(preds)
    assert result.per_question == {"q1": True, "q2": False}
    assert (result.circular, result.vanilla, result.num_questions) == (50.0, 100.0, 2)


def test_circular_bad_groups() -> None:
    rp = multiple_choice.RotationPrediction
    with pytest.raises(ValueError, match=r"question 'q3': rotations \[0, 1, 3\]"):
        multiple_choice.score_circular([rp("q3", k, "A", "A") for k in (0, 1, 3)])
    with pytest.raises(ValueError, match="question 'q4': rotation 0 given twice"):
        multiple_choice.score_circular([rp("q4", 0, "A", "A"), rp("q4", 0, "A", "A")])
    # An unextractable answer (None) is a miss.
    result = multiple_choice.score_circular([rp("q5", 0, None, "A")])
    assert (result.circular, result.vanilla) == (0.0, 0.0)


# ------------------------------------------------------------------------------- answer extraction


# Readings of VLMEvalKit's rule-based matching (vlmeval/utils/matching_util.py, ``can_infer``: lone
# letters, then the "answer is" pattern, then option texts), worked out by hand from its code.
@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) dog", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("The correct option is D", "D"),
        ("The correct answer is **C**", "C"),  # "*" separates like "." and "("
        ("I think it is B", "B"),  # B is the last of 5 tokens
        ("A", "A"),
        ("A.", "A"),
        ("A dog.", "A"),  # a lone capital among the last four tokens is a letter, even an article
        # Two lone letters: the "answer is" pattern decides, its first match wins (re.search).
        ("A or B? The answer is B.", "B"),
        ("The answer is A. No wait, the answer is B.", "A"),
        # The pattern is case-insensitive (VLMEvalKit #1552): a lower-case letter after "answer is".
        ("The answer is b", "B"),
        ("the correct answer is d.", "D"),
        # B is the first of 7 tokens, too early to be read as the answer; the pattern then reads c.
        ("B is wrong; the answer is c.", "C"),
        ("dog", "B"),  # option text
        ("Dog.", "B"),
        ("It is a dog.", "B"),
    ],
)
def test_extract_choice(text: str, letter: str) -> None:
    assert multiple_choice.extract_choice(text, ANIMALS) == letter


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A or B",  # two letters, no "answer is", no option text
        "cat or dog",  # two option texts
        "E",  # not an option letter of a 4-option question
        "I don't know",
        # Longer than twice all options together (2 * 14 chars): an explanation, not an answer.
        "There is a small animal on the sofa and it looks like a dog",
        # The one letter must be among the last four tokens (VLMEvalKit: index > len(tokens) - 5).
        "B is the correct answer here",
        "B. Because the animal in the picture barks",
        # VLMEvalKit's refusals read as "Z", a letter no option has, before any other rule is tried.
        "Cannot determine the answer, maybe B",
        "Z, not the dog",
    ],
)
def test_extract_choice_undecided(text: str) -> None:
    assert multiple_choice.extract_choice(text, ANIMALS) is None


@pytest.mark.parametrize(
    ("text", "options", "ours", "vlmevalkit"),
    [
        # VLMEvalKit's "answer is" pattern takes a letter glued to a word or the article "a".
        ("The answer is a dog", ANIMALS, "B", "A"),
        ("The answer is clearly dog", ANIMALS, "B", "C"),
        # Option texts are matched as whole words, and a whole answer equal to one option wins.
        ("category", ANIMALS, None, "A"),
        ("red car", ["red", "red car", "blue"], "B", None),
    ],
)
def test_extract_choice_documented_differences(
    text: str, options: list[str], ours: str | None, vlmevalkit: str | None
) -> None:
    # docs/evaluation.md, "MMBench": the two places where the reading deliberately differs.
    assert ours != vlmevalkit
    assert multiple_choice.extract_choice(text, options) == ours


def test_llava_letter_match() -> None:
    # LLaVA's convert_seed_for_submission.py: text == answer, on generations stripped by LLaVA.
    assert multiple_choice.llava_letter_match(" B\n", "B")
    for text in ("B.", "(B)", "b", "The answer is B", "B dog"):
        assert not multiple_choice.llava_letter_match(text, "B")


# -------------------------------------------------------------------------------------- likelihood


def test_choose_by_likelihood() -> None:
    assert multiple_choice.choose_by_likelihood([-3.2, -1.5, -1.5, -7.0]) == 1  # tie 1/2 -> lower
    assert multiple_choice.choose_by_likelihood([-math.inf, -2.0]) == 1
    assert multiple_choice.choose_by_likelihood([-0.1]) == 0
    for bad in ([], [-1.0, math.nan]):
        with pytest.raises(ValueError):
            multiple_choice.choose_by_likelihood(bad)


def test_likelihood_reduction_changes_the_choice() -> None:
    # Option A: 4 tokens of -0.5 (sum -2.0, mean -0.5); option B: 1 token of -1.5 (sum = mean = -1.5).
    tokens = [[-0.5, -0.5, -0.5, -0.5], [-1.5]]
    sums = [multiple_choice.option_log_likelihood(t, "sum") for t in tokens]
    means = [multiple_choice.option_log_likelihood(t, "mean") for t in tokens]
    assert sums == [-2.0, -1.5] and means == [-0.5, -1.5]
    assert multiple_choice.choose_by_likelihood(sums) == 1
    assert multiple_choice.choose_by_likelihood(means) == 0
    with pytest.raises(ValueError):
        multiple_choice.option_log_likelihood([])


def test_accuracy() -> None:
    assert multiple_choice.accuracy([True, False, True, True]) == 75.0
    with pytest.raises(ValueError):
        multiple_choice.accuracy([])


# ------------------------------------------------------------------------------------------ ROUGE


def test_rouge_l_textbook() -> None:
    # hyp: the cat sat on the mat / ref: the cat is on the mat (6 tokens each);
    # LCS = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6 for any beta.
    assert rouge.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # hyp 3 tokens, ref 6 tokens, LCS 3 -> P = 1, R = 1/2.
    #   F1 = 2 * 1 * 0.5 / 1.5 = 2/3;  beta 1.2: 2.44 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94
    assert rouge.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge.rouge_l("the cat sat", "the cat sat on the mat", beta=1.2) == pytest.approx(1.22 / 1.94)
    # Case and punctuation go before tokenising.
    assert rouge.rouge_l("The cat, sat.", "the cat sat") == 1.0
    assert rouge.rouge_l("", "the cat") == 0.0
    assert rouge.rouge_l("dog", "the cat") == 0.0


def test_demon_rouge_l_counts_distinct_words() -> None:
    # Distinct words: ref {the, cat, is, on, mat} = 5, hyp {the, cat, sat, on, mat} = 5;
    # the LCS "the cat on the mat" has 4 distinct words -> P = R = 4/5 -> F = 0.8 (textbook: 5/6).
    assert rouge.demon_rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8)
    # hyp "the the the", ref "the cat": textbook LCS 1, P = 1/3, R = 1/2 -> F = (1/3) / (5/6) = 0.4;
    # DEMON: n = 1 ({the}), m = 2, overlap 1 -> P = 1, R = 1/2 -> F = 1 / 1.5 = 2/3.
    assert rouge.rouge_l("the the the", "the cat") == pytest.approx(0.4)
    assert rouge.demon_rouge_l("the the the", "the cat") == pytest.approx(2 / 3)
    assert rouge.demon_rouge_l("...", "the cat") == 0.0  # empty after normalisation
    with pytest.raises(ValueError, match="empty after normalisation"):
        rouge.demon_rouge_l("the cat", "!")


def test_normalize_demon_text() -> None:
    assert rouge.normalize_demon_text('"Fry the EGGS!"\n') == "fry the eggs"
    assert rouge.normalize_demon_text("It costs 1.5 dollars.") == "it costs 1.5 dollars"


def test_cloze_exact_match() -> None:
    assert rouge.cloze_exact_match("The Pancakes.", "the pancakes") == 1.0
    assert rouge.cloze_exact_match("pancake", "pancakes") == 0.0


def test_demon_choice_match() -> None:
    choices = ["fry the eggs", "boil the pasta", "bake the cake"]
    # The prediction shares "boil" and "pasta" with choice 2 only -> cosine > 0 there, 0 elsewhere.
    assert rouge.demon_choice_match("I would boil pasta", choices, "boil the pasta") == 1.0
    assert rouge.demon_choice_match("I would boil pasta", choices, "bake the cake") == 0.0
    # No shared term: every cosine is 0 and the first choice wins.
    assert rouge.demon_choice_match("no idea", choices, "fry the eggs") == 1.0
    assert rouge.demon_choice_match("no idea", choices, "boil the pasta") == 0.0
    with pytest.raises(ValueError, match="not among the choices"):
        rouge.demon_choice_match("x", choices, "steam the rice")


IMAGE_CHOICES = ["Image A", "Image B", "Image C", "Image D"]


@pytest.mark.parametrize(
    ("prediction", "hit"),
    [
        ("Image B", 1.0),
        ("image b.", 1.0),  # DEMON's normalisation: period dropped, lower-cased
        ("Image B: {image#6}", 1.0),  # only the first 7 characters are compared
        ("Image Bravo", 1.0),  # ... even where the letter runs on into a word
        ("Image B or image b", 1.0),  # one image named twice
        ("Image B, not Image C", 0.0),  # two images named: 0, whichever comes first
        ("The answer is Image B", 0.0),  # not at the start
        ("B", 0.0),
        ("", 0.0),
        ("Image C", 0.0),
    ],
)
def test_demon_image_choice_match(prediction: str, hit: float) -> None:
    # DEMON evaluate.py, Eval.evaluate_multi_choice_image, against the gold "Image B".
    assert rouge.demon_image_choice_match(prediction, "Image B") == hit


def test_demon_tfidf_cannot_tell_image_choices_apart() -> None:
    # TF-IDF ignores one-letter words, so "Image A" ... "Image D" are one vector: every prediction
    # goes to the first choice. That is why DEMON scores its image-choice tasks by the rule above.
    assert not rouge.demon_choices_distinguishable(IMAGE_CHOICES)
    assert rouge.demon_choice_match("Image C", IMAGE_CHOICES, "Image A") == 1.0
    assert rouge.demon_choice_match("Image C", IMAGE_CHOICES, "Image C") == 0.0
    assert rouge.demon_choices_distinguishable(["fry the eggs", "boil the pasta"])
    # One pair alike is DEMON's own data (the later one can never win), not a broken task.
    assert rouge.demon_choices_distinguishable(["Image A", "Image B", "the bowl"])
    assert rouge.demon_choices_distinguishable(["A", "B"])  # no terms: DEMON compares exactly
