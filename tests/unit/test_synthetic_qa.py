"""The synthetic world's questions: every answer true, every kind's answers balanced, phrasings as LLaVA's."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from maven_dist.contract.prompts import CHOICE_LETTER, SHORT_ANSWER
from maven_dist.offline import synthetic_qa as qa
from maven_dist.offline.synthetic_scene import COLOURS, SHAPES, SyntheticImage, draw_scene


@pytest.fixture(scope="module")
def scenes() -> list[SyntheticImage]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(300):
        scene = draw_scene(rng, 112, 112 if k % 2 else 84)
        out.append(SyntheticImage(f"{k}.png", 112, 112, scene.background, tuple(scene.objects)))
    return out


def _facts(scenes, kind: str, seed: int = 0) -> list[tuple[qa.Fact, list[SyntheticImage]]]:
    questions, out = qa.BalancedQuestions(random.Random(seed)), []
    for k in range(len(scenes) - 1):
        images = scenes[k : k + 2] if kind == "compare" else [scenes[k]]
        fact = questions.ask(kind, images)
        if fact is not None:
            out.append((fact, images))
    return out


def _count(image: SyntheticImage, words: list[str]) -> int:
    """The count of "red circles" / "circles" in `image`, from the question's words."""
    *colour, plural = words
    return image.count(plural.removesuffix("s"), colour[0] if colour else None)


def test_every_answer_is_true(scenes) -> None:
    for fact, (image, *_rest) in _facts(scenes, "colour"):
        shape = fact.question.removeprefix("What colour is the ").removesuffix("?")
        (obj,) = [o for o in image.objects if o.shape == shape]
        assert fact.answer == obj.colour
    for fact, (image, *_rest) in _facts(scenes, "shape"):
        colour = fact.question.removeprefix("What shape is the ").removesuffix(" object?")
        (obj,) = [o for o in image.objects if o.colour == colour]
        assert fact.answer == obj.shape
    for fact, (image, *_rest) in _facts(scenes, "exists"):
        colour, shape = fact.question.split()[3:5]
        assert fact.answer == ("yes" if image.count(shape, colour) else "no")
    for fact, (image, *_rest) in _facts(scenes, "count"):
        words = fact.question.removeprefix("How many ").removesuffix(" are there?").split()
        assert fact.answer == str(_count(image, words))
    for fact, (image, *_rest) in _facts(scenes, "yes_no"):
        words = fact.question.removeprefix("Are there exactly ").removesuffix(" in the image?").split()
        asked, plural = int(words[0]), words[1]
        assert fact.answer == ("yes" if image.count(plural.removesuffix("s")) == asked else "no")
    for fact, (first, second) in _facts(scenes, "compare"):
        words = fact.question.removeprefix("Which image has more ").split(":")[0].split()
        na, nb = _count(first, words), _count(second, words)
        assert fact.answer == ("same" if na == nb else "first" if na > nb else "second")
        assert fact.num_images == 2


@pytest.mark.parametrize(
    ("kind", "answers"),
    [
        ("colour", tuple(COLOURS)),
        ("shape", SHAPES),
        ("exists", ("yes", "no")),
        ("count", ("0", "1", "2", "3")),
        ("yes_no", ("yes", "no")),
        ("compare", ("first", "second", "same")),
    ],
)
def test_answers_are_balanced(scenes, kind: str, answers: tuple[str, ...]) -> None:
    """Every answer about equally often, however rare in the images: a model blind to its images scores
    chance, and a blank image's "no" or "0" no more."""
    facts = _facts(scenes, kind)
    counts = Counter(fact.answer for fact, _ in facts)
    assert set(counts) == set(answers) == set(qa.ANSWERS[kind])
    assert max(counts.values()) / len(facts) < 1.3 / len(answers), counts
    assert len(facts) > 0.5 * len(scenes)  # an image is skipped only when it has no answer of the kind


def test_exists_no_questions_share_an_attribute_with_the_image_half_the_time(scenes) -> None:
    near = []
    for fact, (image, *_rest) in _facts(scenes, "exists"):
        if fact.answer == "no":
            colour, shape = fact.question.split()[3:5]
            near.append(any(o.colour == colour or o.shape == shape for o in image.objects))
    assert 0.4 < np.mean(near) < 0.9


def test_phrasings() -> None:
    fact = qa.Fact(
        "exists", "Is there a red circle in the image?", "yes", ("yes", "no"), "Yes, there is a red circle."
    )
    assert qa.short_answer(fact) == (f"<image>\nIs there a red circle in the image?\n{SHORT_ANSWER}", "Yes")
    prompt, letter = qa.choice(random.Random(0), fact)
    lines = prompt.split("\n")
    assert lines[0] == "<image>" and lines[1] == fact.question and lines[-1] == CHOICE_LETTER
    assert f"{letter}. yes" in lines and len(lines) == 5
    assert qa.sentence(fact) == (
        "<image>\nIs there a red circle in the image?",
        "Yes, there is a red circle.",
    )
    pair = qa.Fact(
        "compare", "Which image has more circles: first, second or same?", "same", ("first",), "", 2
    )
    assert qa.short_answer(pair)[0].startswith("<image>\n<image>\nWhich image")


def test_ask_rejects_unknown_kinds_and_wrong_image_counts(scenes) -> None:
    with pytest.raises(ValueError, match="unknown question kind 'size'"):
        qa.ask(random.Random(0), "size", scenes[:1])
    with pytest.raises(ValueError, match="a compare question is about 2 image"):
        qa.ask(random.Random(0), "compare", scenes[:1])
