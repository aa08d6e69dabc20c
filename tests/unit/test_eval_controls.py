"""Image-blind controls (``maven eval --control``): what each control does to the questions, the visual
gain and its permutation test, the majority baseline, and the summary's columns, through the real
readers and scorers with predictors that do or do not look at the images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from maven_dist.eval.controls import (
    ControlledTask,
    apply_control,
    majority_baseline,
    visual_gain,
    write_blank_image,
)
from maven_dist.eval.runner import run_task, summary_table, visual_gain_report, within_noise
from maven_dist.eval.tasks.base import Question
from maven_dist.eval.tasks.registry import load_task
from maven_dist.offline.synthetic import generate_synthetic
from maven_dist.offline.synthetic_benchmarks import write_synthetic_benchmarks
from tests.helpers.predictors import ConstantPredictor, OraclePredictor


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    images = generate_synthetic(root / "images", 16, seed=7, image_size=64)
    write_synthetic_benchmarks(root, images, seed=7, questions_per_task=16, heldout_per_kind=12)
    return root


class Looking:
    """Answers right when it sees a question's own images, else one fixed wrong-ish answer: a model that
    uses its images."""

    def __init__(self, originals: dict[str, tuple[Path, ...]]):
        self.originals, self.oracle = originals, OraclePredictor()

    def _sees(self, q: Question) -> bool:
        return q.images == self.originals[q.id]

    def generate(self, questions: Sequence[Question]) -> list[str]:
        right = self.oracle.generate(questions)
        return [r if self._sees(q) else "no" for q, r in zip(questions, right, strict=True)]

    def option_scores(self, questions: Sequence[Question]) -> list[tuple[float, ...]]:
        right = self.oracle.option_scores(questions)
        return [
            r if self._sees(q) else tuple(range(len(q.options)))
            for q, r in zip(questions, right, strict=True)
        ]


class Blind(Looking):
    def _sees(self, q: Question) -> bool:
        return False


def test_controls_replace_only_the_images(bench, tmp_path) -> None:
    questions = load_task("heldout", bench, tmp_path).questions()
    blank = write_blank_image(tmp_path / "blank.png")
    assert Image.open(blank).getpixel((0, 0)) == (122, 116, 104)  # LLaVA's padding colour
    for control in ("blank", "swap", "none"):
        controlled = apply_control(questions, control, blank)
        assert [q.id for q in controlled] == [q.id for q in questions]
        assert [q.reference for q in controlled] == [q.reference for q in questions]
        for q, c in zip(questions, controlled, strict=True):
            if control == "blank":
                assert c.images == (blank,) * len(q.images) and c.prompt == q.prompt
            elif control == "swap":
                assert len(c.images) == len(q.images) and c.images != q.images and c.prompt == q.prompt
            else:
                assert c.images == () and "<image>" not in c.prompt
                assert c.prompt in q.prompt.replace("<image>\n", "")
    with pytest.raises(ValueError, match="unknown control 'dark'"):
        apply_control(questions, "dark", blank)


def _gains(bench, tmp_path, predictor_type, control: str):
    task = load_task("heldout", bench, tmp_path / "cache")
    predictor = predictor_type({q.id: q.images for q in task.questions()})
    real = run_task(task, predictor, tmp_path / "real")
    controlled = ControlledTask(task, control, write_blank_image(tmp_path / "blank.png"))
    other = run_task(controlled, predictor, tmp_path / f"control-{control}")
    return task, real, visual_gain(task.score, real.questions, real.predictions, other.predictions)


@pytest.mark.parametrize("control", ["blank", "swap", "none"])
def test_a_looking_model_gains_and_a_blind_one_is_within_noise(bench, tmp_path, control) -> None:
    _, real, gains = _gains(bench, tmp_path / "looking", Looking, control)
    for metric, value in real.metrics.items():
        assert value == 100.0
        assert gains[metric].gain == pytest.approx(100.0 - gains[metric].control)
        if gains[metric].gain > 50:  # 12 questions a kind: a gain this large is no accident
            assert gains[metric].p_value < 0.01 and not gains[metric].within_noise, (metric, gains[metric])
    _, _, gains = _gains(bench, tmp_path / "blind", Blind, control)
    assert all(g.gain == 0.0 and g.p_value == 1.0 and g.within_noise for g in gains.values())


def test_majority_is_the_best_constant_answer(bench, tmp_path) -> None:
    task = load_task("heldout", bench, tmp_path)
    majority = majority_baseline(task, task.questions())
    for kind in ("exists", "count", "colour"):
        metric = f"{kind}/accuracy"
        answers = {str(q.reference).lower() for q in task.questions() if q.id.startswith(f"{kind}/")}
        constants = [run_task(task, ConstantPredictor(a), tmp_path / a).metrics[metric] for a in answers]
        assert majority[metric] == pytest.approx(max(constants))
    # The held-out answers are balanced: no constant answer does well.
    assert majority["exists/accuracy"] == pytest.approx(50.0, abs=10)
    assert majority["colour/accuracy"] < 40


def test_summary_and_report_carry_the_gain_and_the_flag(bench, tmp_path) -> None:
    task, real, gains = _gains(bench, tmp_path, Looking, "blank")
    real.majority = majority_baseline(task, real.questions)
    real.controls["blank"] = gains
    _, blind, blind_gains = _gains(bench, tmp_path / "b", Blind, "blank")
    blind.name = "blind"
    blind.controls["blank"] = blind_gains
    table = summary_table([real, blind])
    assert table.splitlines()[0].startswith("| task | metric | value | majority | blank | gain vs blank |")
    assert "| heldout | choice/accuracy | 100.00 |" in table
    assert "+0.00 (noise)" in table and table.count("(noise)") == len(blind_gains)
    report = visual_gain_report([real])
    entry = report["heldout"]["exists/accuracy"]
    assert entry["value"] == 100.0 and entry["blank"]["gain"] == 100.0 - entry["blank"]["score"]
    assert entry["blank"]["within_noise"] is False and 0 < entry["blank"]["p_value"] < 0.05
    assert within_noise([real]) == [] and len(within_noise([blind])) == len(blind_gains)
