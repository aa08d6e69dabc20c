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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


class OraclePredictor:
    """Answers with each question's reference: the upper bound of a scorer (tests, sanity checks)."""

    def generate(self, questions: Sequence[Question]) -> list[str]:
        return [_reference_text(q.reference) for q in questions]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        letters = [option_letters(len(q.options)) for q in questions]
        return [
            tuple(0.0 if ls[k] == q.reference else -1.0 for k in range(len(ls)))
            for q, ls in zip(questions, letters, strict=True)
        ]


class ConstantPredictor:
    """Always the same answer (and the same option index): what the answer distribution alone scores."""

    def __init__(self, answer: str, option: int = 0):
        self.answer, self.option = answer, option

    def generate(self, questions: Sequence[Question]) -> list[str]:
        return [self.answer for _ in questions]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        return [tuple(0.0 if k == self.option else -1.0 for k in range(len(q.options))) for q in questions]


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    num_questions: int
    skipped: list[str]
    seconds: float


def run_task(
    task: Task,
    predictor: Predictor,
    out_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] | None = None,
    limit: int | None = None,
) -> TaskResult | None:
    """Predict every question of `task` not predicted yet (this rank's batches), then merge and score on rank
    0 (its result; None on other ranks). Every rank must call it (`barrier` synchronises them). `limit`
    keeps the task's first questions only (smoke tests; the score is then of those)."""
    start = time.perf_counter()
    task_dir = Path(out_dir) / task.name
    if rank == 0:
        task_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    questions = task.questions()
    _check_unique(task, questions)
    questions = questions[:limit] if limit is not None else questions
    done = _read_predictions(task_dir)
    todo = [q for q in questions if q.id not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = batches[rank::world_size]
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
    return TaskResult(task.name, metrics, len(questions), list(task.skipped), time.perf_counter() - start)


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


def _reference_text(reference) -> str:
    if isinstance(reference, str):
        return reference
    if isinstance(reference, list | tuple) and reference:
        return Counter(reference).most_common(1)[0][0]
    return str(reference)


def summary_table(results: Sequence[TaskResult]) -> str:
    """A markdown table: one row per task and metric."""
    lines = ["| task | metric | value | questions | skipped |", "|---|---|---|---|---|"]
    for r in results:
        for k, (metric, value) in enumerate(sorted(r.metrics.items())):
            shown = f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else str(value)
            extra = (str(r.num_questions), str(len(r.skipped))) if k == 0 else ("", "")
            lines.append(f"| {r.name if k == 0 else ''} | {metric} | {shown} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines) + "\n"
