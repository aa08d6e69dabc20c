"""Add one per-image column to every shard, resumably, with per-image failures recorded.

Both offline jobs (patch labels, discrete codes) have the same shape: for each shard, compute one
value per image of every row, write the column with ``update_shard_columns`` (atomic per shard),
and record images that could not be processed in ``<column>_rejects.jsonl`` beside the shards with
shard, row, id, image index, image path and reason. A failed image gets a null entry in the column,
so a sample keeps its other images and the loader can tell "no label" from "label all zeros".

Resuming: shards that already have the column are skipped (unless ``overwrite``). Reject lines of
every shard that will be (re)computed are dropped first, and a shard's lines are appended just
before its atomic rewrite, so after a crash anywhere each shard's rejects appear exactly once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from tqdm import tqdm

from maven_dist.data.shards import list_shards, read_shard, update_shard_columns
from maven_dist.offline.discrete import DiscreteTokenizer, TokenizerKind, load_discrete_tokenizer


@dataclass(frozen=True)
class ImageItem:
    """One image of one row, with what a column builder may need to look at."""

    shard: str
    row: int
    sample_id: str
    index: int
    """Position of the image within its sample."""
    image_path: str
    width: int
    """Original width (``image_sizes``)."""
    height: int
    """Original height."""
    image_bytes: bytes
    """Original bytes when the shard kept them, else the (aspect-preserving) stored bytes."""
    text: str
    """All turns of the sample, ``<image>`` placeholders removed."""


@dataclass(frozen=True)
class ItemFailure:
    reason: str


@dataclass
class JobReport:
    column: str
    shards_done: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    images: int = 0
    rejected: int = 0
    rejects_path: Path | None = None


def sample_text(conversations: list[dict[str, str]]) -> str:
    """The sample's words for text-guided segmentation: every turn, placeholders removed."""
    return " ".join(turn["value"].replace("<image>", " ") for turn in conversations).strip()


def iter_items(table: pa.Table, shard: str) -> Iterator[ImageItem]:
    columns = ["id", "conversations", "image_paths", "images", "image_sizes"]
    if "original_images" in table.column_names:
        columns.append("original_images")
    data = table.select(columns).to_pylist()
    for row, rec in enumerate(data):
        text = sample_text(rec["conversations"] or [])
        originals = rec.get("original_images") or [None] * len(rec["images"])
        for j, (path, stored, size, orig) in enumerate(
            zip(rec["image_paths"], rec["images"], rec["image_sizes"], originals, strict=True)
        ):
            yield ImageItem(shard, row, rec["id"], j, path, size[0], size[1], orig or stored, text)


def _batches(items: Iterator[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    batch: list[ImageItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_column_job(
    shards_dir: str | Path,
    column: str,
    build_compute: Callable[[], Callable[[list[ImageItem]], list[list[int] | ItemFailure]]],
    *,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Fill `column` of every shard with ``compute(batch of images)`` -> one value or failure each.

    ``build_compute()`` makes `compute` (loads models, reads annotations); it is called only when
    some shard needs work, so a finished job costs nothing to rerun.
    """
    shards = list_shards(shards_dir)
    if not shards:
        raise FileNotFoundError(f"no shard-*.arrow files in {shards_dir}: run tools/prepare_data.py first")
    todo = [s for s in shards if overwrite or column not in read_shard(s).schema.names]
    report = JobReport(column, rejects_path=Path(shards_dir) / f"{column}_rejects.jsonl")
    report.shards_skipped = [s.name for s in shards if s not in todo]
    if not todo:
        return report
    _drop_rejects(report.rejects_path, {s.name for s in todo})
    compute = build_compute()
    total = sum(pc.sum(pc.list_value_length(read_shard(s)["images"])).as_py() or 0 for s in todo)
    bar = tqdm(total=total, desc=column, unit="img", disable=not progress)
    for shard in todo:
        bar.set_postfix_str(shard.name)
        table = read_shard(shard)
        values: list[list[list[int] | None]] = [
            [None] * n for n in table["images"].combine_chunks().value_lengths().to_pylist()
        ]
        rejects = []
        for batch in _batches(iter_items(table, shard.name), batch_size):
            for item, result in zip(batch, _compute_isolated(compute, batch), strict=True):
                report.images += 1
                if isinstance(result, ItemFailure):
                    rejects.append(_reject_record(item, column, result.reason))
                else:
                    values[item.row][item.index] = result
            bar.update(len(batch))
        del table  # release the memory map before the shard is replaced
        with report.rejects_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rejects)
        update_shard_columns(shard, {column: lambda _t, v=values: pa.array(v)})
        report.rejected += len(rejects)
        report.shards_done.append(shard.name)
    bar.close()
    return report


def _compute_isolated(compute, batch: list[ImageItem]) -> list[list[int] | ItemFailure]:
    """Run a batch; if it raises, rerun image by image so only the bad image is rejected.

    When every image of a multi-image batch fails on its own too, the fault is not in the data
    (a missing model file, out of memory): that error stops the job instead of rejecting everything.
    """
    try:
        results = compute(batch)
    except Exception as batch_error:
        results, errors = [], []
        for item in batch:
            try:
                results.extend(compute([item]))
            except Exception as exc:  # a corrupt image, an unreadable annotation: record, go on
                errors.append(exc)
                results.append(ItemFailure(f"{type(exc).__name__}: {exc}"))
        if len(batch) > 1 and len(errors) == len(batch):
            raise batch_error
    if len(results) != len(batch):
        raise RuntimeError(f"column builder returned {len(results)} values for {len(batch)} images")
    return results


def _reject_record(item: ImageItem, column: str, reason: str) -> dict:
    return {
        "shard": item.shard,
        "row": item.row,
        "id": item.sample_id,
        "image": item.index,
        "image_path": item.image_path,
        "column": column,
        "reason": reason,
    }


def _drop_rejects(path: Path, shards: set[str]) -> None:
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["shard"] not in shards
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def tokenize_shards(
    shards_dir: str | Path,
    tokenizer: TokenizerKind | DiscreteTokenizer,
    path: str | Path | None = None,
    *,
    eva_path: str | Path | None = None,
    device: str = "",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Write every image's discrete codes into the shards' ``image_codes`` column.

    `tokenizer` is a loaded :class:`DiscreteTokenizer` or a kind (``seed``/``kmeans``) loaded from
    `path` (see :func:`load_discrete_tokenizer`) only if a shard needs codes. Images are the
    original bytes when the shards kept them (``--keep-original``), else the stored ones.
    """

    def build_compute():
        tok = tokenizer
        if isinstance(tok, str):
            if path is None:
                raise ValueError(f"tokenizer={tok!r} needs the path of its weights")
            tok = load_discrete_tokenizer(tok, path, eva_path=eva_path, device=device, dtype=dtype)
        return lambda items: encode_items(tok, items)

    return run_column_job(
        shards_dir,
        "image_codes",
        build_compute,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
    )


def encode_items(tokenizer: DiscreteTokenizer, items: list[ImageItem]) -> list[list[int] | ItemFailure]:
    """Codes per image; raises on an undecodable image (the job then isolates it)."""
    images = [Image.open(io.BytesIO(item.image_bytes)).convert("RGB") for item in items]
    codes = tokenizer.encode(images)
    if tuple(codes.shape) != (len(items), tokenizer.num_codes):
        raise RuntimeError(f"tokenizer returned codes of shape {list(codes.shape)} for {len(items)} images")
    if len(codes) and (codes.min() < 0 or codes.max() >= tokenizer.codebook_size):
        raise RuntimeError(f"tokenizer returned codes outside [0, {tokenizer.codebook_size})")
    return codes.tolist()
