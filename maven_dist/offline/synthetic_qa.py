"""Questions about the synthetic shapes world, each with its answer true by construction.

Training (the demo's conversations, ``offline/synthetic.py``) and evaluation (the held-out set and the
benchmark files, ``offline/synthetic_benchmarks.py``) ask the same kinds of question in the same phrasings: the model
is trained on the question types it is scored on, as LLaVA-665K carries VQAv2 and GQA, and it is never
scored on an image it was trained on.

A question is drawn *answer first* (then a subject that has that answer), and :class:`BalancedQuestions`
asks for each kind's answers in turn, so every answer of a kind is equally common: a model that ignores
its images scores the majority baseline and no more, and neither the wording nor a blank image (no
objects: "no", "0") can pass for sight.

=========  ========================================================  =====================================
kind       question                                                  answer
=========  ========================================================  =====================================
colour     What colour is the circle?                                one of 6 colours (a shape the image
                                                                     has once)
shape      What shape is the red object?                             circle, square or triangle
exists     Is there a red circle in the image?                       yes or no, 1:1; half of the "no"
                                                                     questions name a present colour or
                                                                     shape, so colour alone cannot answer
count      How many red circles are there? / How many circles ...    0 to 3, uniformly
yes_no     Are there exactly 2 circles in the image? (MME-style)     yes or no, 1:1
compare    Which image has more red circles: first, second or same?  first, second or same, uniformly
           (two images)
=========  ========================================================  =====================================

Each fact can be asked three ways: ``short`` (LLaVA's single-word instruction: the VQA benchmarks),
``choice`` (lettered options and the letter instruction: MMBench, SEED-Bench) and ``sentence`` (a whole
sentence back, the chat style of LLaVA-Instruct).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from maven_dist.contract.prompts import CHOICE_LETTER, SHORT_ANSWER
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER
from maven_dist.offline.synthetic_scene import COLOURS, SHAPES, SyntheticImage

KINDS = ("colour", "shape", "exists", "count", "yes_no", "compare")
SINGLE_IMAGE_KINDS = KINDS[:-1]
MAX_COUNT = 3
"""Counts asked about run 0..MAX_COUNT (answers drawn uniformly among them)."""
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "exists": ("yes", "no"),
    "count": tuple(str(n) for n in range(MAX_COUNT + 1)),
    "yes_no": ("yes", "no"),
    "compare": ("first", "second", "same"),
}
"""Every answer each kind has: questions are drawn answer first, so these come out equally often."""


@dataclass(frozen=True)
class Fact:
    """A question about one or two images and its true short answer."""

    kind: str
    question: str
    answer: str
    """The short answer: a colour, a shape, ``yes``/``no``, a digit, ``first``/``second``/``same``."""
    alternatives: tuple[str, ...]
    """Every answer the question's kind has (``ANSWERS``; the options of a multiple-choice phrasing)."""
    sentence: str
    """The answer as a whole sentence (chat style)."""
    num_images: int = 1


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else f"{shape}s"


def _kinds(image: SyntheticImage) -> list[tuple[str, str]]:
    """(colour, shape) pairs present, in order of first appearance."""
    return list(dict.fromkeys((o.colour, o.shape) for o in image.objects))


def _subjects(images: Sequence[SyntheticImage]) -> list[tuple[str | None, str]]:
    """What can be counted: every shape, and every (colour, shape) the images show or miss by one attribute."""
    present = {k for image in images for k in _kinds(image)}
    near = {(c, s) for c in COLOURS for s in SHAPES if any(c == pc or s == ps for pc, ps in present)}
    return [(None, s) for s in SHAPES] + sorted(near)


def _count(image: SyntheticImage, subject: tuple[str | None, str]) -> int:
    colour, shape = subject
    return image.count(shape, colour)


def _name(subject: tuple[str | None, str], n: int = 2) -> str:
    colour, shape = subject
    return f"{colour} {_plural(shape, n)}" if colour else _plural(shape, n)


def _colour_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    (image,) = images
    found = [o for o in image.objects if o.colour == answer and image.count(o.shape) == 1]
    if not found:
        return None
    shape = rng.choice(found).shape
    return Fact(
        "colour", f"What colour is the {shape}?", answer, ANSWERS["colour"], f"The {shape} is {answer}."
    )


def _shape_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    (image,) = images
    colours = [o.colour for o in image.objects]
    found = [o for o in image.objects if o.shape == answer and colours.count(o.colour) == 1]
    if not found:
        return None
    colour = rng.choice(found).colour
    question = f"What shape is the {colour} object?"
    return Fact("shape", question, answer, ANSWERS["shape"], f"The {colour} object is a {answer}.")


def _exists_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    (image,) = images
    present = _kinds(image)
    if answer == "yes":
        colour, shape = rng.choice(present)
        sentence = f"Yes, there is a {colour} {shape}."
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if image.count(s, c) == 0]
        # Half of the "no" questions share a colour or a shape with something in the image.
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
        sentence = f"No, there is no {colour} {shape}."
    return Fact("exists", f"Is there a {colour} {shape} in the image?", answer, ANSWERS["exists"], sentence)


def _count_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    (image,) = images
    n = int(answer)
    found = [s for s in _subjects(images) if _count(image, s) == n]
    if not found:
        return None
    subject = rng.choice(found)
    verb = "is" if n == 1 else "are"
    sentence = f"There {verb} {_NUMBER_WORDS[n]} {_name(subject, n)}."
    return Fact("count", f"How many {_name(subject)} are there?", answer, ANSWERS["count"], sentence)


def _yes_no_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    (image,) = images
    shape = rng.choice(SHAPES)
    n = image.count(shape)
    asked = n if answer == "yes" else rng.choice([k for k in range(MAX_COUNT + 2) if k != n])
    sentence = (
        f"{answer.capitalize()}, there {'is' if n == 1 else 'are'} {_NUMBER_WORDS[n]} {_plural(shape, n)}."
    )
    question = f"Are there exactly {asked} {_plural(shape, asked)} in the image?"
    return Fact("yes_no", question, answer, ANSWERS["yes_no"], sentence)


def _compare_fact(rng: random.Random, images: Sequence[SyntheticImage], answer: str) -> Fact | None:
    a, b = images

    def verdict(s: tuple[str | None, str]) -> str:
        na, nb = _count(a, s), _count(b, s)
        return "same" if na == nb else ("first" if na > nb else "second")

    found = [s for s in _subjects(images) if (_count(a, s) or _count(b, s)) and verdict(s) == answer]
    if not found:
        return None
    subject = rng.choice(found)
    na, nb = _count(a, subject), _count(b, subject)
    sentence = (
        f"Both images have {_NUMBER_WORDS[na]} {_name(subject, na)}."
        if answer == "same"
        else f"The {answer} image has more {_name(subject)} ({max(na, nb)} against {min(na, nb)})."
    )
    question = f"Which image has more {_name(subject)}: first, second or same?"
    return Fact("compare", question, answer, ANSWERS["compare"], sentence, num_images=2)


_ASK = {
    "colour": _colour_fact,
    "shape": _shape_fact,
    "exists": _exists_fact,
    "count": _count_fact,
    "yes_no": _yes_no_fact,
    "compare": _compare_fact,
}


def ask(
    rng: random.Random, kind: str, images: Sequence[SyntheticImage], answer: str | None = None
) -> Fact | None:
    """A question of `kind` about `images` (two for ``compare``, else one) whose answer is `answer` (drawn
    uniformly from ``ANSWERS[kind]`` when None); None when these images have no such question (no shape
    occurs once in red, say). Ask for the answers in turn (:class:`BalancedQuestions`) for a balanced set."""
    if kind not in _ASK:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")
    need = 2 if kind == "compare" else 1
    if len(images) != need:
        raise ValueError(f"a {kind} question is about {need} image(s), got {len(images)}")
    return _ASK[kind](rng, images, rng.choice(ANSWERS[kind]) if answer is None else answer)


class BalancedQuestions:
    """Asks, of each kind, for the answer asked least so far that the images have: over many images the
    answers of a kind come out about equally often, however rare some are in the images, and an image is
    only skipped when it has no answer of that kind at all."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.asked = {kind: dict.fromkeys(answers, 0) for kind, answers in ANSWERS.items()}

    def ask(self, kind: str, images: Sequence[SyntheticImage]) -> Fact | None:
        counts = self.asked[kind]
        for answer in sorted(counts, key=lambda a: (counts[a], self.rng.random())):
            fact = ask(self.rng, kind, images, answer)
            if fact is not None:
                counts[answer] += 1
                return fact
        return None


# ------------------------------------------------------------------------------------------ phrasing


def image_prefix(num_images: int) -> str:
    """The placeholders a question starts with (LLaVA's layout: images first, one per line)."""
    return f"{IMAGE_PLACEHOLDER}\n" * num_images


def short_answer(fact: Fact) -> tuple[str, str]:
    """(prompt, answer) with LLaVA's single-word instruction; yes/no answers capitalised as LLaVA's data has them."""
    answer = fact.answer.capitalize() if fact.alternatives == ("yes", "no") else fact.answer
    return f"{image_prefix(fact.num_images)}{fact.question}\n{SHORT_ANSWER}", answer


def choice_options(rng: random.Random, fact: Fact, max_options: int = 4) -> list[str]:
    """The true answer and up to ``max_options - 1`` others, shuffled."""
    others = [a for a in fact.alternatives if a != fact.answer]
    options = [fact.answer, *rng.sample(others, min(len(others), max_options - 1))]
    rng.shuffle(options)
    return options


def choice(rng: random.Random, fact: Fact) -> tuple[str, str]:
    """(prompt, letter): lettered options and LLaVA's letter instruction (the MMBench prompt)."""
    options = choice_options(rng, fact)
    lines = [fact.question, *(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)), CHOICE_LETTER]
    return image_prefix(fact.num_images) + "\n".join(lines), "ABCD"[options.index(fact.answer)]


def sentence(fact: Fact) -> tuple[str, str]:
    """(prompt, answer) in chat style: the bare question, a whole sentence back."""
    return f"{image_prefix(fact.num_images)}{fact.question}", fact.sentence
