"""Run benchmark tasks with a predictor: batched, data-parallel over ranks, resumable, scored once.

Questions are cut into batches of ``batch_size`` in task order and batch k goes to rank k mod world size,
so every batch holds the same questions whatever the number of ranks: two ranks give exactly the
predictions of one (the runner test checks it). Each rank appends its predictions to its own file under
``OUT/<task>/`` as batches finish; a rerun skips every question already predicted there (resume after a
crash or a preemption). When all ranks are done, rank 0 merges the files into
``OUT/<task>/predictions.jsonl`` (question order; one line per question: id, prompt, images, prediction,
reference), scores the task and writes ``OUT/<task>/metrics.json``; no question is scored twice or lost
(the merge checks every id is there exactly once).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from maven_dist.eval.controls import Gain
from maven_dist.eval.scoring.multiple_choice import choose_by_likelihood, option_letters
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question, Task

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


class Predictor(Protocol):
    """Answers questions: generated text (``generate`` mode) or option log-likelihoods (``choice``)."""

    def generate(self, questions: Sequence[Question]) -> list[str]: ...

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]: ...


class MavenPredictor:
    """A trained MaVEn answering through :class:`~maven_dist.inference.MavenGenerator` (greedy decoding)."""

    def __init__(self, generator, max_new_tokens: int = 64):
        self.generator, self.max_new_tokens = generator, max_new_tokens

    def generate(self, questions: Sequence[Question]) -> list[str]:
        results = self.generator.generate(
            [q.prompt for q in questions],
            [list(q.images) for q in questions],
            max_new_tokens=self.max_new_tokens,
        )
        return [r.text.strip() for r in results]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        prompts = [q.prompt for q in questions for _ in q.options]
        options = [o for q in questions for o in q.options]
        images = [list(q.images) for q in questions for _ in q.options]
        flat = [score for score, _ in self.generator.loglikelihood(prompts, options, images)]
        out, start = [], 0
        for q in questions:
            out.append(tuple(flat[start : start + len(q.options)]))
            start += len(q.options)
        return out


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    num_questions: int
    skipped: list[str]
    seconds: float
    questions: list[Question] = field(default_factory=list, repr=False)
    """The questions scored (after ``limit``), with their own images."""
    predictions: dict[str, Prediction] = field(default_factory=dict, repr=False)
    """Every scored question's prediction, by question id."""
    majority: dict[str, float] = field(default_factory=dict)
    """Per metric, the best constant answer's score (with ``maven eval --control``; ``eval/controls.py``)."""
    controls: dict[str, dict[str, Gain]] = field(default_factory=dict)
    """Per control (``blank``, ``swap``, ``none``) and metric: the score under it and the visual gain."""


def run_task(
    task: Task,
    predictor: Predictor,
    out_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] | None = None,
) -> TaskResult | None:
    """Predict every question of `task` not predicted yet (this rank's batches), then merge and score on rank
    0 (its result; None on other ranks). Every rank must call it (`barrier` synchronises them). To score
    fewer questions, cut the task first (``tasks.base.first_questions``)."""
    start = time.perf_counter()
    task_dir = Path(out_dir) / task.name
    if rank == 0:
        task_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    questions = task.questions()
    _check_unique(task, questions)
    done = _read_predictions(task_dir)
    todo = [q for q in questions if q.id not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = batches[rank::world_size]
    # Every rank must split the same `todo`: a rank that read the predictions after a faster one had begun
    # writing its share would split fewer questions, and some would fall to no rank.
    barrier()
    with open(task_dir / f"rank{rank:05d}.jsonl", "a") as out:
        for k, batch in enumerate(mine):
            by_id = questions_by_id(batch)
            for prediction in _predict(predictor, batch):
                out.write(json.dumps(_record(by_id[prediction.question_id], prediction)) + "\n")
            out.flush()
            if progress is not None:
                progress(k + 1, len(mine))
    barrier()
    if rank != 0:
        return None
    predictions = _merge(task_dir, questions)
    metrics = task.score(predictions)
    (task_dir / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    seconds = time.perf_counter() - start
    return TaskResult(task.name, metrics, len(questions), list(task.skipped), seconds, questions, predictions)


def _predict(predictor: Predictor, batch: list[Question]) -> list[Prediction]:
    out: dict[str, Prediction] = {}
    generate = [q for q in batch if q.mode == "generate"]
    for q, text in zip(generate, predictor.generate(generate) if generate else [], strict=True):
        out[q.id] = Prediction(q.id, text)
    choice = [q for q in batch if q.mode == "choice"]
    for q, scores in zip(choice, predictor.option_scores(choice) if choice else [], strict=True):
        letter = option_letters(len(q.options))[choose_by_likelihood(scores)]
        out[q.id] = Prediction(q.id, letter, tuple(float(s) for s in scores))
    return [out[q.id] for q in batch]


def questions_by_id(questions: Sequence[Question]) -> dict[str, Question]:
    return {q.id: q for q in questions}


def _record(question: Question, prediction: Prediction) -> dict:
    return {
        "id": question.id,
        "prompt": question.prompt,
        "images": [str(p) for p in question.images],
        "mode": question.mode,
        "prediction": prediction.prediction,
        "scores": list(prediction.scores),
        "reference": question.reference,
    }


def _read_predictions(task_dir: Path) -> dict[str, Prediction]:
    """Every prediction already written for the task (final file and per-rank files); a line cut short by
    a crash is ignored (its question is predicted again)."""
    found: dict[str, Prediction] = {}
    if not task_dir.is_dir():
        return found
    for path in sorted(task_dir.glob("rank*.jsonl")) + (
        [task_dir / PREDICTIONS] if (task_dir / PREDICTIONS).is_file() else []
    ):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            found[row["id"]] = Prediction(row["id"], row["prediction"], tuple(row.get("scores", ())))
    return found


def _merge(task_dir: Path, questions: list[Question]) -> dict[str, Prediction]:
    predictions = _read_predictions(task_dir)
    missing = [q.id for q in questions if q.id not in predictions]
    if missing:
        raise RuntimeError(
            f"{task_dir}: {len(missing)} questions have no prediction after every rank finished, e.g. {missing[:3]}"
        )
    wanted = questions_by_id(questions)
    lines = [json.dumps(_record(wanted[q.id], predictions[q.id])) for q in questions]
    tmp = task_dir / (PREDICTIONS + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(task_dir / PREDICTIONS)
    for shard in task_dir.glob("rank*.jsonl"):
        shard.unlink()
    return {q.id: predictions[q.id] for q in questions}


def _check_unique(task: Task, questions: list[Question]) -> None:
    counts = Counter(q.id for q in questions)
    twice = [i for i, n in counts.items() if n > 1]
    if twice:
        raise BenchmarkError(f"task {task.name}: question ids appear more than once: {twice[:5]}")


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def summary_table(results: Sequence[TaskResult]) -> str:
    """A markdown table: one row per task and metric. With controls (``maven eval --control``) it adds the
    majority baseline and, per control, the score under it and the visual gain, marked ``(noise)`` where the
    permutation test cannot tell it from zero (``eval/controls.py``)."""
    controls = list(dict.fromkeys(c for r in results for c in r.controls))
    header = ["task", "metric", "value"]
    if controls:
        header += ["majority", *(f"{c} | gain vs {c}" for c in controls)]
    header += ["questions", "skipped"]
    columns = sum(h.count("|") + 1 for h in header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * columns]
    for r in results:
        for k, (metric, value) in enumerate(sorted(r.metrics.items())):
            row = [r.name if k == 0 else "", metric, _number(value)]
            if controls:
                row.append(_number(r.majority[metric]) if metric in r.majority else "")
                for c in controls:
                    gain = r.controls.get(c, {}).get(metric)
                    if gain is None:
                        row += ["", ""]
                        continue
                    noise = " (noise)" if gain.within_noise else ""
                    row += [_number(gain.control), f"{gain.gain:+.2f}{noise}"]
            row += [str(r.num_questions), str(len(r.skipped))] if k == 0 else ["", ""]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def within_noise(results: Sequence[TaskResult]) -> list[str]:
    """``task/metric (control)`` of every visual gain the permutation test cannot tell from zero."""
    return [
        f"{r.name}/{metric} ({control})"
        for r in results
        for control, gains in r.controls.items()
        for metric, gain in sorted(gains.items())
        if gain.within_noise
    ]


def visual_gain_report(results: Sequence[TaskResult]) -> dict:
    """``visual_gain.json``: per task and metric, the score, the majority baseline and, per control, the
    score under it, the visual gain, its p-value and whether it is within noise."""
    return {
        r.name: {
            metric: {
                "value": value,
                "majority": r.majority.get(metric),
                **{
                    control: {
                        "score": gains[metric].control,
                        "gain": gains[metric].gain,
                        "p_value": gains[metric].p_value,
                        "within_noise": gains[metric].within_noise,
                    }
                    for control, gains in r.controls.items()
                    if metric in gains
                },
            }
            for metric, value in r.metrics.items()
        }
        for r in results
    }
