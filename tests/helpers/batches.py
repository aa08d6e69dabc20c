"""Hand-built batches that exercise every path of the model (mid-text image, two images, text->codes)."""

from __future__ import annotations

import torch

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID


def make_batch(model_or_layout, num_codes: int, image_size: int, num_patches: int, seed: int = 0) -> Batch:
    """Three rows: an image mid-text, two images, and a caption followed by its codes as targets."""
    layout = getattr(model_or_layout, "layout", model_or_layout)
    g = torch.Generator().manual_seed(seed)
    t2i_codes = layout.code_to_token_id(torch.randint(0, layout.codebook_size, (num_codes,), generator=g))
    text = lambda n: torch.randint(3, layout.text_size, (n,), generator=g).tolist()  # noqa: E731
    rows = [
        [1, *text(2), IMAGE_PLACEHOLDER_ID, *text(4), 2],
        [1, IMAGE_PLACEHOLDER_ID, *text(1), IMAGE_PLACEHOLDER_ID, *text(3), 2],
        [1, *text(3), layout.img_start_id, *t2i_codes.tolist(), layout.img_end_id],
    ]
    width = max(len(r) for r in rows) + 2
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    labels = ids.clone()
    labels[(ids == IMAGE_PLACEHOLDER_ID) | (mask == 0)] = IGNORE_INDEX
    return Batch(
        pixel_values=torch.randn(3, 3, image_size, image_size, generator=g),
        image_codes=torch.randint(0, layout.codebook_size, (3, num_codes), generator=g),
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        patch_labels=(torch.rand(3, num_patches, generator=g) > 0.5).float(),
        sample_ids=[f"s{seed}-{i}" for i in range(3)],
    )
