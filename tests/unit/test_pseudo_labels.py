"""Patch labels from masks, COCO polygons/RLE, VG boxes, and the shard writer (issue 8)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.shards import BASE_SCHEMA, read_shard, shard_name, write_shard_atomic
from maven_dist.offline.pseudo_labels.coco import CocoMasks, annotation_mask
from maven_dist.offline.pseudo_labels.make_labels import grid_from_tower, make_patch_labels
from maven_dist.offline.pseudo_labels.noun_phrases import extract_noun_phrases, grounding_prompt
from maven_dist.offline.pseudo_labels.patch_labels import mask_to_patch_labels
from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest, box_mask
from maven_dist.offline.pseudo_labels.visual_genome import VisualGenomeBoxes
from maven_dist.offline.shard_jobs import read_rejects
from maven_dist.offline.synthetic import generate_synthetic


def _labels_grid(mask: np.ndarray, grid: int, threshold: float = 0.0) -> np.ndarray:
    return mask_to_patch_labels(mask, grid, threshold).reshape(grid, grid)


# --------------------------------------------------------------------------- hand-made masks


def test_edge_pixels_land_in_the_patch_that_contains_them():
    grid, side = 4, 48  # 12-pixel cells
    for (y, x), (gy, gx) in {
        (0, 0): (0, 0),
        (11, 11): (0, 0),
        (12, 12): (1, 1),
        (47, 47): (3, 3),
        (0, 47): (0, 3),
    }.items():
        mask = np.zeros((side, side), dtype=bool)
        mask[y, x] = True
        expected = np.zeros((grid, grid), dtype=np.uint8)
        expected[gy, gx] = 1
        np.testing.assert_array_equal(_labels_grid(mask, grid), expected, err_msg=f"pixel {(y, x)}")


def test_pixel_straddling_a_fractional_cell_border_labels_both_patches():
    # 10 px on a 3-patch grid: cells are 10/3 px wide, so pixel 3 covers [3, 4) which crosses 3.33.
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 3] = True
    np.testing.assert_array_equal(_labels_grid(mask, 3)[0], [1, 1, 0])


def test_one_pixel_object_is_one_patch_and_disappears_above_its_coverage():
    mask = np.zeros((336, 336), dtype=bool)
    mask[200, 100] = True
    labels = mask_to_patch_labels(mask, 24)
    assert labels.sum() == 1 and labels[(200 // 14) * 24 + 100 // 14] == 1
    assert mask_to_patch_labels(mask, 24, threshold=1 / 196 - 1e-6).sum() == 1  # covers exactly 1/196
    assert mask_to_patch_labels(mask, 24, threshold=1 / 196).sum() == 0


def test_half_covered_patch_and_threshold():
    mask = np.zeros((20, 20), dtype=bool)
    mask[:10, :5] = True  # left half of the top-left 10x10 patch
    assert _labels_grid(mask, 2, threshold=0.49)[0, 0] == 1
    assert _labels_grid(mask, 2, threshold=0.5)[0, 0] == 0


@pytest.mark.parametrize(("width", "height"), [(40, 20), (20, 40), (40, 25), (37, 52)])
def test_letterboxed_images_follow_the_image_transform(width, height):
    """A pixel's patch is where ImageTransform.pad_to_square puts it, for wide, tall and odd pads."""
    grid = 4
    side = max(width, height)
    transform = ImageTransform(image_size=side)
    rng = np.random.default_rng(0)
    for y, x in [
        (0, 0),
        (height - 1, width - 1),
        (height // 2, width // 3),
        *rng.integers(0, [height, width], (5, 2)),
    ]:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y, x] = 255
        square = np.asarray(transform.pad_to_square(Image.fromarray(pixels)))
        (sy,), (sx,) = np.nonzero(square.sum(-1) == 765)
        mask = np.zeros((height, width), dtype=bool)
        mask[y, x] = True
        cell = side / grid
        rows = {int(sy // cell), int(np.ceil((sy + 1) / cell) - 1)}
        cols = {int(sx // cell), int(np.ceil((sx + 1) / cell) - 1)}
        expected = np.zeros((grid, grid), dtype=np.uint8)
        for r in rows:
            for c in cols:
                expected[r, c] = 1
        np.testing.assert_array_equal(
            _labels_grid(mask, grid), expected, err_msg=f"{width}x{height} pixel {(y, x)}"
        )


def test_full_and_empty_masks():
    assert mask_to_patch_labels(np.ones((30, 30), bool), 3).tolist() == [1] * 9
    assert mask_to_patch_labels(np.zeros((30, 50), bool), 5).sum() == 0
    # A full mask on a 40x20 image covers only the rows the image occupies, not the padding.
    full_wide = _labels_grid(np.ones((20, 40), bool), 4)
    np.testing.assert_array_equal(full_wide, [[0] * 4, [1] * 4, [1] * 4, [0] * 4])
    full_tall = _labels_grid(np.ones((40, 20), bool), 4)
    np.testing.assert_array_equal(full_tall, [[0, 1, 1, 0]] * 4)


# --------------------------------------------------------------------------- COCO and VG


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    rng = np.random.default_rng(seed)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, min(height, width) / 4
    return ((yy - cy) ** 2 / 1.5 + (xx - cx) ** 2) < r**2


def test_coco_rle_path_equals_the_mask_it_encodes():
    for seed, (h, w) in enumerate([(50, 70), (64, 64), (33, 90)]):
        mask = _blob(h, w, seed)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")  # as stored in JSON
        np.testing.assert_array_equal(annotation_mask(rle, w, h), mask)
        np.testing.assert_array_equal(
            mask_to_patch_labels(annotation_mask(rle, w, h), 7), mask_to_patch_labels(mask, 7)
        )


def test_coco_polygon_path_equals_hand_rasterised_mask():
    h, w = 40, 60
    expected = np.zeros((h, w), dtype=bool)
    expected[5:15, 10:20] = True  # rectangle with integer corners (10, 5)-(20, 15)
    expected[20:35, 30:35] = True  # an L shape: vertical bar ...
    expected[30:35, 35:50] = True  # ... and its foot
    rect = [10, 5, 20, 5, 20, 15, 10, 15]
    ell = [30, 20, 35, 20, 35, 30, 50, 30, 50, 35, 30, 35]
    got = annotation_mask([rect, ell], w, h)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(mask_to_patch_labels(got, 6), mask_to_patch_labels(expected, 6))


def test_coco_uncompressed_crowd_rle_and_size_mismatch():
    mask = _blob(30, 40, 3)
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    np.testing.assert_array_equal(annotation_mask({"size": [30, 40], "counts": counts}, 40, 30), mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    with pytest.raises(ValueError, match="does not match"):
        annotation_mask(rle, 41, 30)


def test_coco_source_on_the_synthetic_set_gives_the_exact_object_masks(tmp_path):
    data = generate_synthetic(tmp_path / "syn", num_images=6, seed=1)
    source = CocoMasks([data.instances_json])
    for i, image in enumerate(data.images):
        req = MaskRequest(f"images/{image.file_name}", image.width, image.height)
        np.testing.assert_array_equal(source.mask(req), data.masks(i).any(axis=0))
    missing = source.mask(MaskRequest("elsewhere/nope.png", 10, 10))
    assert isinstance(missing, MaskFailure) and "nope.png" in missing.reason
    first = data.images[0]
    wrong = source.mask(MaskRequest(first.file_name, first.width + 1, first.height))
    assert isinstance(wrong, MaskFailure) and "says" in wrong.reason


def test_box_mask_and_visual_genome_regions(tmp_path):
    m = box_mask(np.array([[2, 3, 5, 4], [-4, 8, 1, 20]]), width=8, height=10)
    expected = np.zeros((10, 8), bool)
    expected[3:4, 2:5] = True
    expected[8:10, 0:1] = True
    np.testing.assert_array_equal(m, expected)
    regions = [
        {
            "id": 7,
            "regions": [
                {
                    "region_id": 1,
                    "image_id": 7,
                    "phrase": "a red kite",
                    "x": 1,
                    "y": 1,
                    "width": 4,
                    "height": 2,
                },
                {
                    "region_id": 2,
                    "image_id": 7,
                    "phrase": "Blue sky",
                    "x": 0,
                    "y": 0,
                    "width": 10,
                    "height": 10,
                },
            ],
        }
    ]
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(regions))
    req = MaskRequest("VG_100K/7.jpg", 10, 10, text="Look at A red kite!")
    kite = VisualGenomeBoxes([path]).mask(req)
    assert kite.sum() == 8 and kite[1:3, 1:5].all()
    assert VisualGenomeBoxes([path], select="all").mask(req).all()
    assert isinstance(
        VisualGenomeBoxes([path]).mask(MaskRequest("7.jpg", 10, 10, "nothing here")), MaskFailure
    )
    assert isinstance(VisualGenomeBoxes([path]).mask(MaskRequest("8.jpg", 10, 10, "kite")), MaskFailure)


def test_noun_phrases():
    assert extract_noun_phrases("A man riding a brown horse on the beach.") == ["man", "brown horse", "beach"]
    assert extract_noun_phrases("There are two red circles and one blue square.") == [
        "red circles",
        "blue square",
    ]
    assert extract_noun_phrases("Is it?") == []
    assert extract_noun_phrases("the man's red hat; it's a dog") == ["man", "red hat", "dog"]
    assert grounding_prompt(["cat", "red sofa"]) == "cat . red sofa ."


# --------------------------------------------------------------------------- shards


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic_shards(
    data, shards_dir, per_shard: int = 3, extra_paths: dict[int, str] | None = None
) -> None:
    """Shards in the data module's schema, one caption sample per synthetic image (test fixture)."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(data.images):
        path = (extra_paths or {}).get(i, image.file_name)
        pil = Image.open(data.image_root / image.file_name)
        rows.append(
            {
                "id": f"cap-{i:05d}",
                "source": "captions.json",
                "source_index": i,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe."},
                    {"from": "gpt", "value": "red circle"},
                ],
                "image_paths": [path],
                "images": [_png(pil)],
                "image_sizes": [[image.width, image.height]],
                "num_tokens": 10,
            }
        )
    for k in range(0, len(rows), per_shard):
        table = pa.Table.from_pylist(rows[k : k + per_shard], schema=BASE_SCHEMA)
        write_shard_atomic(table, shards_dir / shard_name(k // per_shard))


def test_make_patch_labels_writes_exact_labels_records_rejects_and_resumes(tmp_path):
    data = generate_synthetic(tmp_path / "syn", num_images=5, seed=2)
    shards = tmp_path / "shards"
    write_synthetic_shards(data, shards, extra_paths={4: "unknown/zzz.png"})
    report = make_patch_labels(shards, "coco", annotations=[data.instances_json], grid=6, progress=False)
    assert report.shards_done == ["shard-00000.arrow", "shard-00001.arrow"] and report.rejected == 1
    labels = [lab for s in report.shards_done for lab in read_shard(shards / s)["patch_labels"].to_pylist()]
    for i in range(4):
        assert labels[i] == [mask_to_patch_labels(data.masks(i).any(axis=0), 6).tolist()]
    assert labels[4] == [None]
    (reject,) = read_rejects(shards, "patch_labels")
    assert report.rejects_dir == shards / "patch_labels_rejects"
    assert [p.name for p in report.rejects_dir.iterdir()] == [
        "shard-00001.jsonl"
    ]  # shards without rejects: none
    assert reject["shard"] == "shard-00001.arrow" and reject["row"] == 1 and reject["id"] == "cap-00004"
    assert "zzz.png" in reject["reason"]
    again = make_patch_labels(shards, "coco", annotations=[data.instances_json], grid=6, progress=False)
    assert again.shards_done == [] and len(again.shards_skipped) == 2
    assert len(read_rejects(shards, "patch_labels")) == 1
    redo = make_patch_labels(
        shards, "coco", annotations=[data.instances_json], grid=3, overwrite=True, progress=False
    )
    assert len(redo.shards_done) == 2 and len(read_rejects(shards, "patch_labels")) == 1
    assert len(read_shard(shards / "shard-00000.arrow")["patch_labels"][0][0]) == 9


def test_grid_from_tower(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"image_size": 336, "patch_size": 14}))
    assert grid_from_tower(tmp_path) == 24
    with pytest.raises(FileNotFoundError, match="config.json"):
        grid_from_tower(tmp_path / "missing")
