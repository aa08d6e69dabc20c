"""The image transform pads as LLaVA-1.5's expand2square does: colour and placement (issue 24, item 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maven_dist.data.image_transform import ImageTransform
from maven_dist.offline.pseudo_labels.patch_labels import mask_to_patch_labels

# openai/clip-vit-large-patch14-336's image_mean, as its preprocessor_config.json publishes it.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


def llava_expand2square(image: Image.Image) -> Image.Image:
    """LLaVA's rule (train.py, mm_utils.py): background tuple(int(x * 255) for x in image_mean) -- for CLIP's
    mean int(122.77), int(116.75), int(104.09) -- and the image pasted at ((side - w) // 2, (side - h) // 2)
    of a side = max(w, h) square. Written out, not imported."""
    w, h = image.size
    side = max(w, h)
    out = Image.new(image.mode, (side, side), (122, 116, 104))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


@pytest.mark.parametrize("size", [(7, 4), (4, 9), (5, 5)])
def test_pad_to_square_is_llavas_expand2square(size, tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": 336, "size": 336, "image_mean": CLIP_MEAN, "image_std": [0.27, 0.26, 0.28]})
    )
    transform = ImageTransform.from_pretrained(tmp_path)
    assert transform.pad_color == (122, 116, 104)  # truncated, as LLaVA; rounding gave (123, 117, 104)
    got = np.asarray(transform.pad_to_square(image))
    assert np.array_equal(got, np.asarray(llava_expand2square(image)))


def test_patch_labels_follow_the_padding():
    """A full mask of a 2:1 image labels the rows the image covers after the centred pad, never the padding."""
    labels = np.asarray(mask_to_patch_labels(np.ones((12, 24), dtype=bool), grid=4, threshold=0.0)).reshape(
        4, 4
    )
    assert labels[0].sum() == 0 and labels[3].sum() == 0 and labels[1:3].all()  # pad rows 0-5 and 18-23 of 24
