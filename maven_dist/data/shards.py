"""Arrow shards: the on-disk format between ``maven prepare`` and the loader.

A shards directory holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC *file* format,
i.e. Feather v2, uncompressed so that ``pyarrow.memory_map`` reads them without copying), plus
``manifest.json`` and ``rejects.jsonl`` written by preparation. One row is one sample.

Schema (version :data:`SCHEMA_VERSION`); per-image columns are lists with one entry per image of the
sample, in the order of the ``<image>`` placeholders:

==================  ====================================  ==============================================
column              type                                  meaning
==================  ====================================  ==============================================
id                  string                                sample id from the source JSON (unique)
source              string                                source JSON/JSONL file name
source_index        int64                                 0-based line (JSONL) or list index (JSON)
conversations       list<struct<from: string,             the LLaVA turns, ``<image>`` kept in the text
                    value: string>>
image_paths         list<string>                          each image's path as written in the source JSON
images              list<binary>                          encoded image bytes (PNG/JPEG), RGB, possibly
                                                          resized for the tower (see ``image_sizes``)
image_sizes         list<list<int32>>                     [width, height] of each *original* image
num_tokens          int32                                 text tokens of the longest view, images
                                                          expanded (the length the loader groups by)
original_images     list<binary>   (optional)             original bytes, when prepared with --keep-original
image_codes         list<list<int32>> (optional)          per image: its discrete codes (maven tokenize)
patch_labels        list<list<uint8>> (optional)          per image: grid*grid labels, raster order
==================  ====================================  ==============================================

Optional columns are added to existing shards with :func:`update_shard_columns`, which rewrites a
shard atomically (temp file, fsync, rename), so a crash never leaves a half-written shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from maven_dist.contract.atomic_write import atomic_path

SCHEMA_VERSION = 1
SHARD_GLOB = "shard-*.arrow"

CONVERSATION_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
BASE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("source_index", pa.int64()),
        ("conversations", CONVERSATION_TYPE),
        ("image_paths", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("image_sizes", pa.list_(pa.list_(pa.int32()))),
        ("num_tokens", pa.int32()),
    ]
)
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "original_images": pa.list_(pa.binary()),
    "image_codes": pa.list_(pa.list_(pa.int32())),
    "patch_labels": pa.list_(pa.list_(pa.uint8())),
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def list_shards(shards_dir: str | Path) -> list[Path]:
    """The shard files of a shards directory, in shard order."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"shards directory {shards_dir} does not exist: run maven prepare first")
    return sorted(shards_dir.glob(SHARD_GLOB))


def read_shard(path: str | Path) -> pa.Table:
    """Memory-map one shard; the table's buffers point into the page cache, nothing is copied."""
    # The map stays open for as long as any buffer of the returned table is alive.
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def read_shard_schema(path: str | Path) -> pa.Schema:
    """A shard's columns and types, without reading its rows."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).schema


def write_shard_atomic(table: pa.Table, path: str | Path) -> None:
    """Write `table` to `path` atomically (contract/atomic_write.py)."""
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table, max_chunksize=256)


def check_column(name: str, array: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.Array | pa.ChunkedArray:
    """Coerce an optional column to its schema type and check it has one entry per image."""
    if len(array) != table.num_rows:
        raise ValueError(f"column {name!r} has {len(array)} rows, the shard has {table.num_rows}")
    expected = OPTIONAL_COLUMNS.get(name)
    if expected is not None and array.type != expected:
        array = array.cast(expected)
    if name in OPTIONAL_COLUMNS:
        lengths = pc.list_value_length(array).to_pylist()
        images = pc.list_value_length(table["images"]).to_pylist()
        for row, (got, want) in enumerate(zip(lengths, images, strict=True)):
            if got is not None and got != want:
                raise ValueError(
                    f"column {name!r} row {row} (id {table['id'][row].as_py()}) has {got} entries "
                    f"but the sample has {want} images; give one entry per image"
                )
    return array


def update_shard_columns(
    shard_path: str | Path, columns: dict[str, Callable[[pa.Table], pa.Array | pa.ChunkedArray]]
) -> pa.Schema:
    """Add or replace columns of one shard, atomically; returns the new schema.

    Each callable receives the current table (memory-mapped) and returns the column's values, one
    per row. ``image_codes`` and ``patch_labels`` must hold one list per image of the row (see the
    module docstring for the types; integer lists are cast). Rows of other samples are untouched.
    """
    shard_path = Path(shard_path)
    table = read_shard(shard_path)
    for name, build in columns.items():
        array = check_column(name, build(table), table)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    write_shard_atomic(table, shard_path)
    return table.schema
