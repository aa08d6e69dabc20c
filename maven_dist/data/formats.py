"""Each stage's format of the same shards: one shard row -> one :class:`Example`; examples -> :class:`Batch`.

A *format* (``data.format``) is how a stage reads a shard row; which visual *views* (discrete,
continuous) each image then contributes to the sequence is ``stage.views``, the model's business.

======================  ========================================================================
``data.format``         what a sample becomes
======================  ========================================================================
``patch_labels``        stage 1: its images, their codes and patch labels; no text
``discrete_alignment``  stage 2: image -> caption (``plain`` template), or, for a deterministic
                        ``data.t2i_fraction`` of single-image samples, caption -> ``<img>`` codes
                        ``</img>`` as literal tokens (the targets) with no image input
``captions``            stage 3: image -> caption (``plain`` template)
``conversations``       stage 4: the whole conversation with ``data.template``, multi-image allowed
======================  ========================================================================

The caption is the sample's first answer. A sample whose expanded length exceeds ``data.max_length``
raises :class:`BadSample`, which the loader counts and skips (preparation already rejected samples
too long for the longest format, so this only fires when a stage is configured longer than the data
was prepared for).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from maven_dist.contract.batch import Batch
from maven_dist.contract.lengths import num_kept_patches, visual_tokens_per_image
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER, VocabLayout
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.templates import check_turns, render

DATA_FORMATS = ("patch_labels", "discrete_alignment", "captions", "conversations")


class BadSample(ValueError):
    """A sample that cannot be turned into training input; the loader logs it and skips it."""


class DataError(RuntimeError):
    """The shards cannot serve this view at all (e.g. a column is missing); the message says what to run."""


@dataclass
class Example:
    sample_id: str
    pixel_values: list[torch.Tensor | ScaledPixels] = field(default_factory=list)
    """One [3, S, S] tensor (or not yet normalised ScaledPixels) per image, in placeholder order."""
    image_codes: list[list[int]] = field(default_factory=list)
    """One code list per image (empty lists when the view does not need codes)."""
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    patch_labels: list[list[int]] | None = None
    length: int = 0
    """Sequence positions after image expansion (what a packed row is filled with); 0 without text."""


@dataclass(frozen=True)
class SampleFormat:
    """Everything a worker needs to turn a row into an example (picklable, no model objects)."""

    name: str
    template: str = "vicuna_v1"
    max_length: int = 2048
    num_codes: int = 32
    num_patches: int = 576
    keep_ratio: float = 0.25
    views: tuple[str, ...] = ("discrete", "continuous")
    t2i_fraction: float = 0.5
    seed: int = 0

    @property
    def selector_runs(self) -> bool:
        """The continuous view with alpha < 1: the selector scores patches against each image's h_eos."""
        kept = num_kept_patches(self.num_patches, self.keep_ratio)
        return self.name == "patch_labels" or ("continuous" in self.views and kept < self.num_patches)

    @property
    def needs_codes(self) -> bool:
        """Codes are read for the discrete view, for stage 2's targets, and for h_eos wherever the
        selector runs (stage 3 too, though its sequence has no discrete block)."""
        return self.name == "discrete_alignment" or "discrete" in self.views or self.selector_runs

    @property
    def needs_patch_labels(self) -> bool:
        return self.name == "patch_labels"

    @property
    def tokens_per_image(self) -> int:
        return visual_tokens_per_image(self.num_codes, self.num_patches, self.keep_ratio, self.views)

    @property
    def columns(self) -> list[str]:
        cols = ["id", "conversations", "images"]
        if self.needs_codes:
            cols.append("image_codes")
        if self.needs_patch_labels:
            cols.append("patch_labels")
        return cols

    def check_columns(self, column_names: Sequence[str], where: str) -> None:
        """Raise DataError naming the tool to run when the shards lack a column this format needs."""
        missing = []
        if self.needs_codes and "image_codes" not in column_names:
            why = "; the selector computes h_eos from them" if self.selector_runs else ""
            missing.append(
                f"'image_codes' (format {self.name!r}, views {list(self.views)}{why}): run maven tokenize"
            )
        if self.needs_patch_labels and "patch_labels" not in column_names:
            missing.append("'patch_labels' (stage 1 targets): run maven labels")
        if missing:
            raise DataError(
                f"{where} lacks columns this stage needs: {'; '.join(missing)} on the shards first"
            )

    def is_text_to_image(self, sample_id: str, num_images: int) -> bool:
        """Stage 2's per-sample direction, fixed by (seed, id) so it never depends on order or workers."""
        if self.name != "discrete_alignment" or num_images != 1:
            return False
        digest = hashlib.sha256(f"{self.seed}:{sample_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.t2i_fraction


@dataclass
class ScaledPixels:
    """An image already at the tower's size, as float32 HWC in [0, 1]; :func:`collate` normalises it.

    ``ImageTransform.__call__`` normalises a strided CHW view of a fresh array and the batch then
    copies it again in ``torch.stack``. For pre-resized shards the loader instead writes each image
    once into the (shared-memory) batch tensor and normalises it there, with the same float32
    operations in the same order, so the pixels are bit-identical (the loader round-trip test
    checks it) at about a third of the cost.
    """

    hwc: np.ndarray


def decode_image(
    data: bytes, transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor | ScaledPixels:
    """Decode stored bytes; a square RGB image at an ImageTransform's size skips to ScaledPixels."""
    with Image.open(io.BytesIO(data)) as image:
        size = getattr(transform, "image_size", None)
        if type(transform) is ImageTransform and image.mode == "RGB" and image.size == (size, size):
            return ScaledPixels(np.asarray(image, dtype=np.float32) / 255.0)
        return transform(image)


def _pixel_batch(pixels: list[torch.Tensor | ScaledPixels], transform: ImageTransform) -> torch.Tensor:
    """[N, 3, S, S] float32, allocated in shared memory inside a DataLoader worker (as torch's
    default_collate does) so handing it to the main process copies nothing."""
    size = transform.image_size
    shape = (len(pixels), 3, size, size)
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty(shape).share_memory_()
    else:
        out = torch.empty(shape)
    if any(isinstance(p, ScaledPixels) for p in pixels):
        mean = torch.tensor(transform.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(transform.std, dtype=torch.float32).view(3, 1, 1)
    for k, p in enumerate(pixels):
        if isinstance(p, ScaledPixels):
            out[k].copy_(torch.from_numpy(p.hwc).permute(2, 0, 1))
            out[k].sub_(mean).div_(std)
        else:
            out[k].copy_(p)
    return out


def make_example(
    spec: SampleFormat,
    row: dict,
    tokenizer,
    layout: VocabLayout | None,
    transform: Callable[[Image.Image], torch.Tensor],
) -> Example:
    """One shard row (a dict of ``spec.columns``) -> Example; raises BadSample with the reason."""
    sample_id, images = row["id"], row["images"]
    codes = row.get("image_codes") if spec.needs_codes else None
    if spec.needs_codes and (codes is None or any(c is None for c in codes)):
        raise BadSample("image_codes is null for this sample: re-run maven tokenize")
    if codes is not None:
        for c in codes:
            if len(c) != spec.num_codes:
                raise BadSample(f"an image has {len(c)} codes, model.discrete.num_codes is {spec.num_codes}")
    example = Example(
        sample_id, image_codes=[list(c) for c in codes] if codes is not None else [[] for _ in images]
    )

    if spec.name == "patch_labels":
        labels = row.get("patch_labels")
        if labels is None or any(lab is None for lab in labels):
            raise BadSample("patch_labels is null for this sample: re-run maven labels")
        for lab in labels:
            if len(lab) != spec.num_patches:
                raise BadSample(
                    f"patch_labels has {len(lab)} entries, the tower has {spec.num_patches} patches"
                )
        example.patch_labels = [list(lab) for lab in labels]
        example.pixel_values = [decode_image(b, transform) for b in images]
        return example

    turns = row["conversations"]
    if spec.is_text_to_image(sample_id, len(images)):
        if layout is None:
            raise DataError("view 'discrete_alignment' needs the VocabLayout to spell codes as tokens")
        caption = check_turns(turns)[0][1]
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(caption, add_special_tokens=False)
        target = [
            layout.img_start_id,
            *layout.code_to_token_id(torch.tensor(codes[0])).tolist(),
            layout.img_end_id,
        ]
        example.input_ids = prompt + target
        example.labels = [IGNORE_INDEX] * len(prompt) + target
        example.image_codes = []  # the codes are in the text; this sample contributes no image input
        length = len(example.input_ids)
    else:
        template = spec.template if spec.name == "conversations" else "plain"
        if template == "plain":
            question, answer = check_turns(turns)[0]
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            if question.count(IMAGE_PLACEHOLDER) != len(images):
                raise BadSample(
                    f"the first question has {question.count(IMAGE_PLACEHOLDER)} <image> but the sample has "
                    f"{len(images)} images; view {spec.name!r} uses the first round only"
                )
        rendered = render(turns, template, tokenizer)
        example.input_ids, example.labels = rendered.input_ids, rendered.labels
        example.pixel_values = [decode_image(b, transform) for b in images]
        length = rendered.expanded_length(spec.tokens_per_image)
    if length > spec.max_length:
        raise BadSample(f"{length} tokens after image expansion > data.max_length {spec.max_length}")
    example.length = length
    return example


def collate(examples: Sequence[Example], pad_id: int, transform: ImageTransform) -> Batch:
    """Right-pad text, stack images sample-major (the k-th placeholder is image k)."""
    batch = collate_images(examples, transform)
    if examples and examples[0].input_ids is not None:
        length = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[b, :n] = torch.tensor(e.input_ids)
            labels[b, :n] = torch.tensor(e.labels)
            mask[b, :n] = 1
        batch.input_ids, batch.labels, batch.attention_mask = input_ids, labels, mask
    return batch


def collate_images(examples: Sequence[Example], transform: ImageTransform) -> Batch:
    """A batch of the examples' images, codes, patch labels and ids (in this order), without text."""
    pixels = [p for e in examples for p in e.pixel_values]
    codes = [c for e in examples for c in e.image_codes]
    pixel_values = _pixel_batch(pixels, transform)
    width = max((len(c) for c in codes), default=0)
    image_codes = (
        torch.tensor(codes, dtype=torch.long)
        if codes and width
        else torch.zeros(len(codes), 0, dtype=torch.long)
    )
    batch = Batch(
        pixel_values=pixel_values, image_codes=image_codes, sample_ids=[e.sample_id for e in examples]
    )
    if examples and examples[0].patch_labels is not None:
        batch.patch_labels = torch.tensor(
            [lab for e in examples for lab in e.patch_labels], dtype=torch.float32
        )
    return batch
