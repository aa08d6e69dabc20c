"""Shard files: atomic column updates with per-image checks, shard listing."""

from __future__ import annotations

import pyarrow as pa
import pytest

from maven_dist.data.shards import (
    BASE_SCHEMA,
    list_shards,
    read_shard,
    update_shard_columns,
    write_shard_atomic,
)


def _row(sample_id: str, num_images: int) -> dict:
    return {
        "id": sample_id,
        "source": "s.json",
        "source_index": 0,
        "conversations": [{"from": "human", "value": "<image>" * num_images}, {"from": "gpt", "value": "x"}],
        "image_paths": [f"{sample_id}-{k}.png" for k in range(num_images)],
        "images": [bytes([k]) * 4 for k in range(num_images)],
        "image_sizes": [[4, 3]] * num_images,
        "num_tokens": 10,
    }


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard-00000.arrow"
    write_shard_atomic(
        pa.Table.from_pylist([_row("a", 1), _row("b", 2), _row("c", 0)], schema=BASE_SCHEMA), path
    )
    return path


def test_add_and_replace_columns(shard, tmp_path):
    schema = update_shard_columns(
        shard, {"image_codes": lambda t: pa.array([[[1, 2]], [[3, 4], [5, 6]], []])}
    )
    assert schema.field("image_codes").type == pa.list_(pa.list_(pa.int32()))
    update_shard_columns(shard, {"image_codes": lambda t: pa.array([[[9, 9]], [[3, 4], None], []])})
    table = read_shard(shard)
    assert table["image_codes"].to_pylist() == [[[9, 9]], [[3, 4], None], []]
    assert table.drop_columns(["image_codes"]).to_pylist() == [_row("a", 1), _row("b", 2), _row("c", 0)]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.arrow"]  # no temp files left
    assert list_shards(tmp_path) == [shard]


def test_bad_columns_leave_the_shard_untouched(shard):
    before = shard.read_bytes()
    with pytest.raises(ValueError, match=r"row 1 \(id b\) has 1 entries but the sample has 2 images"):
        update_shard_columns(shard, {"patch_labels": lambda t: pa.array([[[1]], [[1]], []])})
    with pytest.raises(ValueError, match="has 2 rows, the shard has 3"):
        update_shard_columns(shard, {"patch_labels": lambda t: pa.array([[[1]], [[1], [0]]])})

    def fails(_table):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        update_shard_columns(
            shard, {"image_codes": lambda t: pa.array([[[1]], [[1], [2]], []]), "patch_labels": fails}
        )
    assert shard.read_bytes() == before


def test_list_shards_needs_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="maven prepare"):
        list_shards(tmp_path / "missing")
