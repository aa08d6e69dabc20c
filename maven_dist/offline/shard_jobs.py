"""Add one per-image column to every shard, resumably, with per-image failures recorded.

Both offline jobs (patch labels, discrete codes) have the same shape: for each shard, compute one
value per image of every row, write the column with ``update_shard_columns`` (atomic per shard),
and record images that could not be processed in ``<column>_rejects/<shard>.jsonl`` beside the shards
with shard, row, id, image index, image path and reason. A failed image gets a null entry in the column,
so a sample keeps its other images and the loader can tell "no label" from "label all zeros".

Resuming: shards that already have the column are skipped (unless ``overwrite``). A shard's reject file
is replaced just before its atomic rewrite, so after a crash anywhere each shard's rejects appear once.

Splitting (``WorkShare``): N processes (GPUs, the tasks of a Slurm array) each take every N-th shard file
of the same ordered list. The shard file is the unit because it is the unit of the atomic write and of
resuming: no two processes ever write the same file, every output (the shard and its reject file) is
exactly what one process would write, so the union of the N parts is a single-process run byte for byte
and nothing needs merging. A rerun with any N (or N=1) finishes whatever is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from tqdm import tqdm

from maven_dist.contract.atomic_write import write_json_atomic
from maven_dist.data.shards import list_shards, read_shard, read_shard_schema, update_shard_columns
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
    rejects_dir: Path | None = None
    """``SHARDS/<column>_rejects/``: one ``<shard>.jsonl`` per shard with rejects (:func:`read_rejects`)."""


class JobInputError(Exception):
    """An input of a column job cannot be used (no shards, a missing or malformed model or annotation
    file); the message names it. The command-line tools exit 2 with it."""


@contextlib.contextmanager
def input_errors(what: str) -> Iterator[None]:
    """Re-raise what reading an input raises (a missing, unreadable or malformed file) as a
    :class:`JobInputError` that names `what`; anything else is an internal failure and passes."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise JobInputError(f"{what}: {detail}") from exc


@dataclass(frozen=True)
class WorkShare:
    """The part of a job one of `count` cooperating processes does: every `count`-th shard file of
    one ordered list, starting at position `index` (``--shard-index`` of ``--num-shards``).

    A stride rather than contiguous blocks: shards directories end in a short shard and may differ in
    image counts, and a stride spreads both over the parts.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"the count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"the index must be in 0 .. {self.count - 1}, got {self.index}")

    @property
    def split_enabled(self) -> bool:
        return self.count > 1

    def select(self, items: Sequence) -> list:
        """This part's items of an ordered sequence."""
        return list(items[self.index :: self.count])


@dataclass(frozen=True)
class ShardPlan:
    """The shard files one process works on, per directory (:func:`plan_shard_files`)."""

    share: WorkShare
    parts: list[tuple[Path, list[Path]]]
    """(directory, this process's shard files in it, in shard order), every directory in the order given."""
    total: int
    """Shard files of all the directories."""

    @property
    def files(self) -> list[Path]:
        return [f for _, files in self.parts for f in files]

    def describe(self) -> str:
        return (
            f"part {self.share.index} of {self.share.count}: {len(self.files)} of {self.total} shard files "
            f"in {len(self.parts)} director{'y' if len(self.parts) == 1 else 'ies'}"
        )


def plan_shard_files(shards_dirs: Sequence[str | Path], share: WorkShare | None = None) -> ShardPlan:
    """This process's shard files of `shards_dirs`.

    All directories' shard files form one list (directories in the order given, each in shard order)
    and `share` takes its stride of it, so several small directories still spread over every part.
    Every directory is listed first: a missing or empty one is a :class:`JobInputError` before any work.
    """
    share = share or WorkShare()
    listed = [(Path(d), _listed_shards(d)) for d in shards_dirs]
    every = [f for _, files in listed for f in files]
    mine = set(share.select(every))
    return ShardPlan(share, [(d, [f for f in files if f in mine]) for d, files in listed], len(every))


def _listed_shards(shards_dir: str | Path) -> list[Path]:
    try:
        shards = list_shards(shards_dir)
    except FileNotFoundError as exc:
        raise JobInputError(str(exc)) from exc
    if not shards:
        raise JobInputError(
            f"no shard-*.arrow files in {shards_dir}: run `maven prepare --out {shards_dir}` first"
        )
    return shards


def rejects_dir(shards_dir: str | Path, column: str) -> Path:
    """Where a column job lists the images it could not process: one file per shard, so processes that
    split the shards never write the same file."""
    return Path(shards_dir) / f"{column}_rejects"


def read_rejects(shards_dir: str | Path, column: str) -> list[dict]:
    """Every reject record of `column` in `shards_dir`, in shard and row order."""
    out = []
    for path in sorted(rejects_dir(shards_dir, column).glob("shard-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return out


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
    shard_files: Sequence[str | Path] | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Fill `column` of every shard with ``compute(batch of images)`` -> one value or failure each.

    `shard_files` limits the job to these shard files of `shards_dir` (this process's part, see
    :func:`plan_shard_files`); by default it takes them all. ``build_compute()`` makes `compute` (loads
    models, reads annotations); it is called only when some shard needs work, so a finished job costs
    nothing to rerun. Inputs that cannot be used raise :class:`JobInputError`.
    """
    shards = _job_shards(shards_dir, shard_files)
    todo = [s for s in shards if overwrite or column not in read_shard_schema(s).names]
    report = JobReport(column, rejects_dir=rejects_dir(shards_dir, column))
    report.shards_skipped = [s.name for s in shards if s not in todo]
    if not todo:
        return report
    with input_errors(f"{column} of {shards_dir}: its models or annotations cannot be used"):
        compute = build_compute()
    meter = _Progress(column, todo, enabled=progress)
    for shard in todo:
        values, rejects = _compute_shard(shard, column, compute, batch_size, meter)
        _write_rejects(report.rejects_dir, shard.name, rejects)
        update_shard_columns(shard, {column: lambda _t, v=values: pa.array(v)})
        report.images += sum(len(v) for v in values)
        report.rejected += len(rejects)
        report.shards_done.append(shard.name)
        meter.shard_done(shard.name, len(rejects))
    meter.close()
    return report


def _job_shards(shards_dir: str | Path, shard_files: Sequence[str | Path] | None) -> list[Path]:
    """The shard files the job works on, in shard order: all of the directory's, or the given ones."""
    shards = _listed_shards(shards_dir)
    if shard_files is None:
        return shards
    wanted = {Path(f).name for f in shard_files}
    unknown = sorted(wanted - {s.name for s in shards})
    if unknown:
        raise ValueError(f"{shards_dir} has no shard files {unknown}")
    return [s for s in shards if s.name in wanted]


def _compute_shard(
    shard: Path, column: str, compute, batch_size: int, meter: _Progress
) -> tuple[list[list[list[int] | None]], list[dict]]:
    """One shard's column values (None where an image failed) and its reject records."""
    table = read_shard(shard)
    values: list[list[list[int] | None]] = [
        [None] * n for n in table["images"].combine_chunks().value_lengths().to_pylist()
    ]
    rejects = []
    for batch in _batches(iter_items(table, shard.name), batch_size):
        for item, result in zip(batch, _compute_isolated(compute, batch), strict=True):
            if isinstance(result, ItemFailure):
                rejects.append(_reject_record(item, column, result.reason))
            else:
                values[item.row][item.index] = result
        meter.images(len(batch))
    del table  # release the memory map before the shard is replaced
    return values, rejects


def _write_rejects(directory: Path, shard_name: str, rejects: list[dict]) -> None:
    """Replace one shard's reject file atomically; a shard without rejects has none."""
    path = directory / f"{Path(shard_name).stem}.jsonl"
    if not rejects:
        path.unlink(missing_ok=True)
        return
    write_json_atomic(path, rejects, lines=True)


class _Progress:
    """Images done: a tqdm bar on a terminal; in a log file (a Slurm array task's ``.out``) a plain line
    per finished shard instead, where a bar's carriage returns would pile up into one line."""

    def __init__(self, column: str, todo: list[Path], enabled: bool):
        total = sum(pc.sum(pc.list_value_length(read_shard(s)["images"])).as_py() or 0 for s in todo)
        self.column, self.shards, self.done = column, len(todo), 0
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=column, unit="img", disable=not enabled or self.lines)
        self.start, self.images_done = time.monotonic(), 0

    def images(self, n: int) -> None:
        self.images_done += n
        self.bar.update(n)

    def shard_done(self, name: str, rejected: int) -> None:
        self.done += 1
        self.bar.set_postfix_str(name)
        if self.lines:
            rate = self.images_done / max(time.monotonic() - self.start, 1e-9)
            print(
                f"[{self.column}] {name} done ({rejected} rejected): {self.done}/{self.shards} shards, "
                f"{self.images_done} images, {rate:.1f} images/s",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


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


def tokenize_shards(
    shards_dir: str | Path,
    tokenizer: TokenizerKind | DiscreteTokenizer,
    path: str | Path | None = None,
    *,
    eva_path: str | Path | None = None,
    device: str = "",
    dtype: torch.dtype = torch.float32,
    shard_files: Sequence[str | Path] | None = None,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Write every image's discrete codes into the shards' ``image_codes`` column.

    `tokenizer` is a loaded :class:`DiscreteTokenizer` or a kind (``seed``/``kmeans``) loaded from
    `path` (see :func:`load_discrete_tokenizer`) only if a shard needs codes. Images are the
    original bytes when the shards kept them (``--keep-original``), else the stored ones.
    `shard_files` limits it to this process's part of the shards (:func:`plan_shard_files`).
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
        shard_files=shard_files,
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
