"""The validation pass's image-blind control (maven_dist/train/validation.py): which images each sample gets,
and the visual gain a real engine measures with it: 0 exactly for a model whose images reach nothing."""

from __future__ import annotations

import pytest
import torch

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER_ID as IMG
from maven_dist.model.parts import apply_trainable
from maven_dist.parallel.local import LocalEngine
from maven_dist.train.validation import (
    BLIND_GAIN,
    blindness_warning,
    image_owners,
    validate,
    with_swapped_images,
)
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches


def batch_of(rows: list[list[int]], segment_ids: list[list[int]] | None = None) -> Batch:
    """Images numbered in order: pixel value k and codes [k, k] for the k-th image."""
    ids = torch.tensor(rows)
    n = int((ids == IMG).sum())
    return Batch(
        pixel_values=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
        image_codes=torch.arange(n).view(n, 1).repeat(1, 2),
        input_ids=ids,
        segment_ids=None if segment_ids is None else torch.tensor(segment_ids),
    )


def images_seen(batch: Batch) -> list[int]:
    return batch.pixel_values[:, 0, 0, 0].long().tolist()


def test_every_sample_gets_another_samples_images_in_the_same_number():
    batch = batch_of([[1, IMG, 5, 2, 0], [1, IMG, IMG, 5, 2], [1, 5, IMG, 2, 0]])
    owners = image_owners(batch)
    assert owners == [0, 1, 1, 2]
    swapped = with_swapped_images(batch)
    seen = images_seen(swapped)
    assert seen == [1, 3, 3, 0]  # the next image owned by another sample, cyclically
    assert all(owners[s] != owners[k] for k, s in enumerate(seen))
    assert swapped.image_codes[:, 0].tolist() == seen  # codes travel with their pixels
    assert swapped.input_ids is batch.input_ids and swapped.pixel_values.shape == batch.pixel_values.shape


def test_packed_rows_are_told_apart_by_their_segments():
    # One row holding two samples (segments 0 and 1), a second row holding sample 2.
    batch = batch_of([[IMG, 5, IMG, 5], [IMG, 5, 0, 0]], segment_ids=[[0, 0, 1, 1], [2, 2, -1, -1]])
    assert image_owners(batch) == [0, 1, 2]
    assert images_seen(with_swapped_images(batch)) == [1, 2, 0]


def test_a_single_sample_keeps_its_images():
    batch = batch_of([[1, IMG, IMG, 2]])
    assert images_seen(with_swapped_images(batch)) == [0, 1]


def cut_off_images(model) -> None:
    """Nothing of the images reaches the LLM (as ``tests/helpers/stage_run.py --blind``): every image's codes
    are code 0 and the projector's output is multiplied by 0."""
    visual_embeds = model.visual_embeds

    def blind(pixel_values, image_codes, h_eos, views):
        out = visual_embeds(pixel_values, torch.zeros_like(image_codes), h_eos, views)
        codes = model.spec.num_codes + 2 if "discrete" in views else 0
        return torch.cat([out[:, :codes], out[:, codes:] * 0], dim=1)

    model.visual_embeds = blind


@pytest.mark.parametrize("blind", [False, True], ids=["sighted", "images cut off"])
def test_the_gain_a_real_engine_measures(tiny_base, blind):
    setup = build_stage_setup(tiny_base.llm_dir.parent, "stage4")
    model = setup.builder()
    apply_trainable(model, setup.cfg.stage.trainable)
    if blind:
        cut_off_images(model)
    engine = LocalEngine(model, setup.cfg.stage, total_steps=1, accumulation=1)
    batches = micro_batches(setup, 2)
    metrics = validate(engine.evaluate, lambda: iter(batches), image_control=True)
    assert metrics["val/visual_gain"] == pytest.approx(
        metrics["val/loss_text_swapped"] - metrics["val/loss_text"]
    )
    if blind:
        assert metrics["val/visual_gain"] == pytest.approx(0.0, abs=1e-6)
        assert "barely uses its images" in blindness_warning("stage4", metrics)
    else:  # a random model's text loss already moves with its images
        assert abs(metrics["val/visual_gain"]) > 1e-4
    assert validate(engine.evaluate, lambda: iter(batches), image_control=False).keys() == {
        k for k in metrics if k not in ("val/loss_text_swapped", "val/visual_gain")
    }


def test_no_control_where_the_stage_has_no_text_loss():
    calls = []

    def evaluate(batches):
        calls.append(list(batches))
        return {"val/loss": 0.3}  # stage 1: the selector's loss only

    assert validate(evaluate, lambda: iter([]), image_control=True) == {"val/loss": 0.3}
    assert len(calls) == 1


def test_the_warning_names_the_losses():
    metrics = {"val/loss_text": 0.70, "val/loss_text_swapped": 0.705, "val/visual_gain": 0.005}
    line = blindness_warning("stage3", metrics)
    assert line.startswith("[stage3] val/visual_gain 0.0050") and "0.7000" in line and "0.7050" in line
    assert blindness_warning("stage3", metrics | {"val/visual_gain": BLIND_GAIN}) is None
    assert blindness_warning("stage1", {"val/loss": 0.2}) is None
