"""DEMONBench-style multi-image tasks: interleaved prompts with several images, open-ended answers.

Layout of ``BENCH_ROOT/demon/``, either one task::

    task.json         {"name": "comparison", "metric": "accuracy" | "rouge_l", "instruction": "..."}
    instances.jsonl   {"id": "0", "prompt": "<image> ... <image> ...", "images": ["images/a.png", ...],
                       "answer": "...", "choices": [...]}
    images/           anything ``images`` names, relative to the task directory

or several, one such folder each (``demon/<task>/task.json``, ...). ``instruction`` is optional and goes
on its own line before every prompt; ``choices`` is optional (multiple-choice tasks). Each ``<image>``
in ``prompt`` is where the next of ``images`` goes, so their numbers must agree.

Scoring (``scoring.rouge``, DEMONBench's ``evaluate.py`` rules), one rule per instance, kept in
``Question.meta["rule"]``:

* ``rouge_l``: the task's metric is ``rouge_l``: DEMON's ROUGE-L F (``demon_rouge_l``);
* ``image_choice``: an ``accuracy`` task named (``name`` or folder, any case) as one of DEMON's
  image-choice datasets (``rouge.DEMON_IMAGE_CHOICE_TASKS``: RecipeQA_VisualCloze,
  RecipeQA_ImageCoherence, COMICS_Panel): ``demon_image_choice_match``, with or without ``choices``,
  as DEMON's ``evaluate_multi_choice_image``; the answer must start with "Image <letter>";
* ``tfidf_choice``: another ``accuracy`` instance with ``choices``: DEMON's TF-IDF nearest choice
  (``demon_choice_match``);
* ``exact``: an ``accuracy`` instance without ``choices``: exact match after DEMON's normalisation
  (``cloze_exact_match``). Not a DEMON rule (its accuracy tasks all have choices or are image-choice).

Both metrics are reported in percent. Metric names: the descriptor's ``metric`` for a single task;
for several, ``<task>/<metric>`` each (question ids ``<task>/<id>``), and no average across them
(accuracy and ROUGE-L do not average meaningfully).

Bad input, all :class:`BenchmarkError` naming the file, line and id (nothing is skipped: every
instance counts in the mean): a bad ``task.json`` (unknown metric), invalid JSON, an id twice, a
missing ``answer``, an ``answer`` not among its ``choices``, choices that DEMON's TF-IDF matcher
cannot tell apart ("Image A" ... "Image D" in a task not named as an image-choice one), an
image-choice answer that does not start with "Image <letter>", placeholders and images that do not
match in number, a missing image or one leading out of the task directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from maven_dist.eval.scoring import rouge, vqa
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question
from maven_dist.eval.tasks.vqa import (
    IMAGE_PLACEHOLDER,
    check_inside,
    check_predictions,
    read_json,
    read_jsonl,
    record_id,
    resolve_inside,
    task_root,
    text_field,
)

METRICS = ("accuracy", "rouge_l")
Rule = Literal["rouge_l", "image_choice", "tfidf_choice", "exact"]


@dataclass(frozen=True)
class _Subtask:
    name: str
    """The descriptor's ``name`` (the folder name when it has none)."""
    metric: str
    prefix: str
    """Question id and metric name prefix: ``""`` for a single task, ``"<folder>/"`` for one of several."""
    image_choice: bool
    """An ``accuracy`` task DEMON scores with ``evaluate_multi_choice_image`` (its name says so)."""


def _score_one(question: Question, prediction: str) -> float:
    rule: Rule = question.meta["rule"]
    if rule == "rouge_l":
        return rouge.demon_rouge_l(prediction, question.reference)
    if rule == "image_choice":
        return rouge.demon_image_choice_match(prediction, question.reference)
    if rule == "tfidf_choice":
        return rouge.demon_choice_match(prediction, question.meta["choices"], question.reference)
    return rouge.cloze_exact_match(prediction, question.reference)


def _rule(subtask: _Subtask, choices: list[str] | None) -> Rule:
    if subtask.metric == "rouge_l":
        return "rouge_l"  # DEMON dispatches on the question type first: open-ended is ROUGE-L
    if subtask.image_choice:
        return "image_choice"
    return "tfidf_choice" if choices else "exact"


def _check_answer(rule: Rule, answer: str, choices: list[str] | None, where: str) -> None:
    """Refuse an instance its rule cannot score meaningfully (every prediction would get the same)."""
    if rule == "rouge_l" and not rouge.normalize_demon_text(answer):
        raise BenchmarkError(f"{where}: answer is empty after normalisation; ROUGE-L needs a reference")
    if rule == "image_choice" and not rouge.is_demon_image_answer(answer):
        raise BenchmarkError(
            f"{where}: answer {answer!r} does not start with an image name ('Image A' ... 'Image D'), "
            "which DEMON's image-choice rule compares (first 7 characters); fix the answer"
        )
    if (
        rule == "tfidf_choice"
        and choices
        and len(choices) > 1
        and not rouge.demon_choices_distinguishable(choices)
    ):
        raise BenchmarkError(
            f"{where}: choices {choices!r} are all the same to DEMON's TF-IDF matcher (it ignores "
            "one-letter words), so every prediction would count as the first; if this is one of "
            f"DEMON's image-choice tasks, name it {' or '.join(rouge.DEMON_IMAGE_CHOICE_TASKS)} "
            "(task.json 'name'), else reword the choices"
        )


class MultiImageTask:
    """One DEMON-style task directory, or a directory of them (layout in the module docstring)."""

    format = "multi_image"

    def __init__(self, root: Path, *, name: str = "demon") -> None:
        self.name = name
        self.root = task_root(root)
        self.skipped: list[str] = []
        self._questions: list[Question] = []
        self._subtasks: list[_Subtask] = []
        if (self.root / "task.json").exists():
            self._read_task(self.root, prefix="")
        else:
            folders = sorted(p for p in self.root.iterdir() if (p / "task.json").exists())
            if not folders:
                raise BenchmarkError(f"{self.root}: no task.json here nor in any sub-folder")
            for folder in folders:
                self._read_task(check_inside(self.root, folder), prefix=f"{folder.name}/")

    def _read_task(self, folder: Path, prefix: str) -> None:
        descriptor_path = check_inside(self.root, folder / "task.json")
        descriptor = read_json(descriptor_path)
        if not isinstance(descriptor, dict):
            raise BenchmarkError(f"{descriptor_path}: expected a JSON object")
        metric = descriptor.get("metric")
        if metric not in METRICS:
            raise BenchmarkError(f"{descriptor_path}: metric {metric!r} is not one of {', '.join(METRICS)}")
        instruction = descriptor.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise BenchmarkError(f"{descriptor_path}: instruction must be a string")
        name = str(descriptor.get("name") or folder.name)
        image_choice = metric == "accuracy" and any(
            rouge.is_demon_image_choice_task(n) for n in (name, folder.name)
        )
        subtask = _Subtask(name, metric, prefix, image_choice)
        self._subtasks.append(subtask)
        path = check_inside(self.root, folder / "instances.jsonl")
        seen: set[str] = set()
        count = 0
        for line, record in read_jsonl(path):
            rid = record_id(record.get("id"), file=path, line=line, key="id")
            if rid in seen:
                raise BenchmarkError(f"{path}:{line}: id {rid} appears twice")
            seen.add(rid)
            self._questions.append(self._question(record, rid, subtask, instruction, folder, path, line))
            count += 1
        if not count:
            raise BenchmarkError(f"{path}: no instances")

    def _question(
        self,
        record: dict,
        rid: str,
        subtask: _Subtask,
        instruction: str | None,
        folder: Path,
        path: Path,
        line: int,
    ) -> Question:
        where = f"{path}:{line}: record {rid}"
        prompt = text_field(record, "prompt", file=path, line=line, record=rid)
        answer = text_field(record, "answer", file=path, line=line, record=rid)
        images = record.get("images")
        if not isinstance(images, list):
            raise BenchmarkError(f"{where}: 'images' is missing or not a list")
        if prompt.count(IMAGE_PLACEHOLDER) != len(images):
            raise BenchmarkError(
                f"{where}: prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} but {len(images)} images"
            )
        files = tuple(resolve_inside(self.root, folder, image, file=path, record=rid) for image in images)
        choices = record.get("choices")
        rule = _rule(subtask, choices)
        meta: dict = {
            "subtask": subtask.name,
            "prefix": subtask.prefix,
            "metric": subtask.metric,
            "rule": rule,
        }
        if choices is not None:
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise BenchmarkError(f"{where}: 'choices' must be a non-empty list of strings")
            normalised = [rouge.normalize_demon_text(c) for c in choices]
            if rouge.normalize_demon_text(answer) not in normalised:
                raise BenchmarkError(f"{where}: answer {answer!r} is not among its choices")
            meta["choices"] = tuple(choices)
        _check_answer(rule, answer, choices, where)
        return Question(
            id=f"{subtask.prefix}{rid}",
            prompt=f"{instruction}\n{prompt}" if instruction else prompt,
            images=files,
            reference=answer,
            meta=meta,
        )

    def questions(self) -> list[Question]:
        """Every instance: tasks by folder name, instances in file order."""
        return list(self._questions)

    def score(self, predictions: dict[str, Prediction]) -> dict[str, float]:
        """Each task's metric in percent (names in the module docstring)."""
        check_predictions(self.name, self._questions, predictions)
        metrics: dict[str, float] = {}
        for subtask in self._subtasks:
            scores = [
                _score_one(q, predictions[q.id].prediction)
                for q in self._questions
                if q.meta["prefix"] == subtask.prefix
            ]
            metrics[f"{subtask.prefix}{subtask.metric}"] = vqa.benchmark_accuracy(scores)
        return metrics
