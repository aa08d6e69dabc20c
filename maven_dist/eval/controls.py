"""Image-blind controls: does the model's score come from its images?

A benchmark score alone cannot tell a model that looks from one that answers from the question's wording
(issue 22: a model that ignored its images scored 73.8 on a VQAv2-style set). ``maven eval --control``
asks every question again with the images taken away, and reports the **visual gain**, the score with
the images minus the score under the control, per task and metric:

* ``blank``: every image replaced by one constant image (CLIP's mean colour, what LLaVA pads with);
* ``swap``: every question gets another question's images (the next set of images of the same count in
  the task, so an image never answers its own question);
* ``none``: the images removed, and their ``<image>`` placeholders with them.

**Within noise.** The gain comes with a paired permutation test: under the null hypothesis that the images
do not matter, a question's prediction with its images and under the control are exchangeable, so the
test swaps them at random (all questions sharing the same images together: MME's two questions of an
image, MMBench's rotations), rescores the task with the benchmark's own rules, and counts how often the
shuffled gain reaches the observed one. ``p_value >= 0.05`` flags the gain as within noise: the
benchmark cannot tell this model from one that ignores its images. A model that ignores them answers
the same under the control, so every shuffle reproduces the observed gain of 0 and p is 1.

**Majority.** The best score a constant answer reaches (each of the task's most common reference
answers given to every question, each option position for likelihood-ranked questions), per metric: what
the question wording and answer distribution allow without looking.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from maven_dist.data.image_transform import CLIP_MEAN
from maven_dist.eval.scoring.multiple_choice import option_letters
from maven_dist.eval.tasks.base import Prediction, Question, Task

Control = Literal["blank", "swap", "none"]
CONTROLS: tuple[str, ...] = ("blank", "swap", "none")
PERMUTATIONS = 200
"""Shuffles of the permutation test (p resolves to 1/201)."""
SIGNIFICANCE = 0.05
MAJORITY_CANDIDATES = 20
"""Most common reference answers tried as constant answers for the majority baseline."""
BLANK_SIZE = 64
_PLACEHOLDER = "<image>"


def blank_image() -> Image.Image:
    """The ``blank`` control's image: CLIP's mean colour (LLaVA's padding colour), everywhere."""
    return Image.new("RGB", (BLANK_SIZE, BLANK_SIZE), tuple(int(m * 255) for m in CLIP_MEAN))


def write_blank_image(path: Path) -> Path:
    """:func:`blank_image` saved as a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blank_image().save(path)
    return path


def without_placeholders(prompt: str) -> str:
    """`prompt` with its ``<image>`` placeholders (and the newline after each) removed: the ``none`` control."""
    return prompt.replace(_PLACEHOLDER + "\n", "").replace(_PLACEHOLDER, "").strip()


def apply_control(questions: Sequence[Question], control: Control, blank_image: Path) -> list[Question]:
    """`questions` with their images replaced as `control` says (see the module doc); ids, prompts,
    options and references unchanged (``none`` also drops the placeholders)."""
    if control == "blank":
        return [dataclasses.replace(q, images=(blank_image,) * len(q.images)) for q in questions]
    if control == "none":
        return [dataclasses.replace(q, images=(), prompt=without_placeholders(q.prompt)) for q in questions]
    if control != "swap":
        raise ValueError(f"unknown control {control!r}; choose one of {', '.join(CONTROLS)}")
    # Distinct image sets in order of first appearance, by count; each goes to the next set of its count.
    sets: dict[int, list[tuple[Path, ...]]] = {}
    for q in questions:
        same_count = sets.setdefault(len(q.images), [])
        if q.images not in same_count:
            same_count.append(q.images)
    swapped = {}
    for group in sets.values():
        for k, images in enumerate(group):
            swapped[images] = group[(k + 1) % len(group)]
    return [dataclasses.replace(q, images=swapped[q.images]) for q in questions]


class ControlledTask:
    """A task whose questions are asked under a control, scored by the task's own rules."""

    def __init__(self, task: Task, control: Control, blank_image: Path):
        self.task, self.control = task, control
        self.name, self.format, self.skipped = task.name, task.format, task.skipped
        self._questions = apply_control(task.questions(), control, blank_image)

    def questions(self) -> list[Question]:
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        return self.task.score(predictions)


@dataclass(frozen=True)
class Gain:
    """One metric's score under a control, and the visual gain over it."""

    control: float
    gain: float
    p_value: float

    @property
    def within_noise(self) -> bool:
        return self.p_value >= SIGNIFICANCE


def visual_gain(
    score: Callable[[dict[str, Prediction]], dict[str, float]],
    questions: Sequence[Question],
    with_images: dict[str, Prediction],
    controlled: dict[str, Prediction],
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Gain]:
    """Per metric of `score`: the controlled score, the gain and its permutation-test p-value (module doc).
    `questions` carry the original images, which group the questions that are swapped together."""
    observed, baseline = score(with_images), score(controlled)
    units: dict[tuple[Path, ...], list[str]] = {}
    for q in questions:
        units.setdefault(q.images, []).append(q.id)
    rng = random.Random(seed)
    reached = Counter()
    for _ in range(permutations):
        first, second = {}, {}
        for ids in units.values():
            a, b = (controlled, with_images) if rng.random() < 0.5 else (with_images, controlled)
            for i in ids:
                first[i], second[i] = a[i], b[i]
        shuffled_first, shuffled_second = score(first), score(second)
        for metric, value in observed.items():
            gain = value - baseline[metric]
            reached[metric] += shuffled_first[metric] - shuffled_second[metric] >= gain - 1e-9
    return {
        metric: Gain(baseline[metric], value - baseline[metric], (1 + reached[metric]) / (1 + permutations))
        for metric, value in observed.items()
    }


def _most_common_reference(reference) -> str:
    if isinstance(reference, list | tuple):
        return Counter(map(str, reference)).most_common(1)[0][0] if reference else ""
    return str(reference)


def majority_baseline(
    task: Task, questions: Sequence[Question], candidates: int = MAJORITY_CANDIDATES
) -> dict[str, float]:
    """Per metric, the best score of a constant answer (module doc). Questions asked by option likelihood
    get the k-th option while generated ones get the k-th most common reference."""
    answers = Counter(_most_common_reference(q.reference) for q in questions if q.mode == "generate")
    ranked = [a for a, _ in answers.most_common(candidates)]
    widest = max((len(q.options) for q in questions if q.mode == "choice"), default=0)
    best: dict[str, float] = {}
    for k in range(max(len(ranked), widest)):
        predictions = {}
        for q in questions:
            if q.mode == "choice":
                letter = option_letters(len(q.options))[min(k, len(q.options) - 1)]
                predictions[q.id] = Prediction(
                    q.id, letter, tuple(float(i == k) for i in range(len(q.options)))
                )
            else:
                predictions[q.id] = Prediction(q.id, ranked[min(k, len(ranked) - 1)] if ranked else "")
        for metric, value in task.score(predictions).items():
            best[metric] = max(best.get(metric, value), value)
    return best
