"""The validation pass, with an image-blind control: does the stage's model use its images?

A stage can train to a fine loss while ignoring every image (issue 22: the miniature's stage 3 aligned its
projector to the captions' text prior, and the model it handed on answered the same with a blank image).
The loss alone cannot tell; the same loss with the images taken away can. So after ``val/loss`` the
validation batches run once more with each sample's images replaced by another sample's of the same
micro-batch (:func:`with_swapped_images`), and the stage logs

* ``val/loss_text_swapped``: the text tokens' loss with the wrong images;
* ``val/visual_gain``: that minus ``val/loss_text``, in nats per text token: how much the images help
  predict the text. About 0 means the model does not use them, whatever its loss.

Only the text tokens' loss is compared: in stage 2 the code tokens are targets drawn from the images
themselves. Stages without a language-model loss (stage 1) get no control. The control costs one more
validation pass; ``stage.val_image_control: false`` turns it off. The same question asked of a finished
model, on benchmarks, is ``maven eval --control`` (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER_ID

TEXT_LOSS, SWAPPED, GAIN = "val/loss_text", "val/loss_text_swapped", "val/visual_gain"
BLIND_GAIN = 0.01
"""A visual gain below this (nats per text token) is reported as a model that barely uses its images."""


def image_owners(batch: Batch) -> list[int]:
    """The sample each of the batch's images belongs to (images are listed sample-major, in order of their
    placeholders; a packed row's samples are told apart by ``segment_ids``)."""
    rows, columns = (batch.input_ids == IMAGE_PLACEHOLDER_ID).nonzero(as_tuple=True)
    if batch.segment_ids is not None:
        return batch.segment_ids[rows, columns].tolist()
    return rows.tolist()


def with_swapped_images(batch: Batch) -> Batch:
    """`batch` with each image replaced by the next image (cyclically) that belongs to another sample: every
    sample sees images of another sample, in the same number. A micro-batch of one sample keeps its images
    (nothing to swap with), which can only pull the measured gain towards 0."""
    owners = image_owners(batch)
    count = len(owners)
    source = []
    for j, owner in enumerate(owners):
        others = (k % count for k in range(j + 1, j + count))
        source.append(next((k for k in others if owners[k] != owner), j))
    index = torch.tensor(source, dtype=torch.long, device=batch.pixel_values.device)
    return replace(
        batch,
        pixel_values=batch.pixel_values[index],
        image_codes=batch.image_codes[index.to(batch.image_codes.device)],
    )


def validate(
    evaluate: Callable[[Iterable[Batch]], dict[str, float]],
    one_pass: Callable[[], Iterator[Batch]],
    image_control: bool,
) -> dict[str, float]:
    """``evaluate`` (an engine's) over one pass of the validation batches, then, where the stage has a text
    loss and `image_control` is on, over a second pass with swapped images: the metrics of the module doc.
    Every rank calls it with the same arguments (the passes are collective)."""
    metrics = evaluate(one_pass())
    if image_control and TEXT_LOSS in metrics:
        swapped = evaluate(with_swapped_images(batch) for batch in one_pass())[TEXT_LOSS]
        metrics |= {SWAPPED: swapped, GAIN: swapped - metrics[TEXT_LOSS]}
    return metrics


def blindness_warning(stage: str, metrics: dict[str, float]) -> str | None:
    """A line for the log when the stage's model barely uses its images, else None."""
    if GAIN not in metrics or metrics[GAIN] >= BLIND_GAIN:
        return None
    return (
        f"[{stage}] val/visual_gain {metrics[GAIN]:.4f}: the text loss is {metrics[TEXT_LOSS]:.4f} with the "
        f"right images and {metrics[SWAPPED]:.4f} with another sample's: this model barely uses its images "
        f"(below {BLIND_GAIN}; docs/evaluation.md, 'Is the model using its images?')"
    )
