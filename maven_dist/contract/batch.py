"""The one batch format every data view produces and the model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """A collated micro-batch.

    Text tensors are right-padded. Image placeholders in ``input_ids`` are
    ``maven_dist.contract.vocab.IMAGE_PLACEHOLDER_ID``; the model expands each one into the image's
    visual block. Images are listed sample-major in order of appearance, so the k-th placeholder of
    the batch (row-major) belongs to ``pixel_values[k]`` / ``image_codes[k]``.

    A *packed* batch (``data.packing``) holds several samples per row, one after another, and says which
    sample each token belongs to in ``segment_ids``; the model restarts positions at 0 for each sample
    and confines attention to it (``maven_dist/model/packing.py``). Samples are then listed row-major.
    """

    pixel_values: torch.Tensor
    """float [N, 3, S, S]: every image of the batch, normalised for the tower."""
    image_codes: torch.Tensor
    """long [N, num_codes]: each image's discrete codes in [0, codebook_size)."""
    input_ids: torch.Tensor | None = None
    """long [B, T]: token ids with image placeholders; None for stage 1 (images only)."""
    labels: torch.Tensor | None = None
    """long [B, T]: target ids, IGNORE_INDEX where no loss is taken."""
    attention_mask: torch.Tensor | None = None
    """long [B, T]: 1 for real tokens, 0 for padding."""
    patch_labels: torch.Tensor | None = None
    """float [N, P]: 1 for patches relevant to the text (stage 1 targets)."""
    sample_ids: list[str] = field(default_factory=list)
    """Source ids of the samples, for error messages and logs."""
    segment_ids: torch.Tensor | None = None
    """long [B, T], packed batches only: the sample (index into ``sample_ids``) each token belongs to,
    -1 on padding; a row's samples are contiguous and in order. None: one sample per row."""

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    @property
    def num_images(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def num_samples(self) -> int:
        """Samples: rows of text (several per row when packed), or images for an image-only (stage 1) batch."""
        if self.segment_ids is not None:
            return len(self.sample_ids)
        return self.input_ids.shape[0] if self.input_ids is not None else self.num_images
